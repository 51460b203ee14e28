// What a dashboard JSON of deploy/grafana/provisioning may hold, in Grafana's own types (@grafana/schema, generated
// from Grafana's CUE schema). check.mjs types each JSON file as a literal `Board`: tsc then rejects a missing required
// field, a wrong type, a value outside an enum, and (excess-property checking) an unknown or misspelt field.
import type { DataQuery, Dashboard, FieldConfigSource, Panel, RowPanel } from "@grafana/schema";
import type * as stat from "@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen";
import type * as timeseries from "@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";

// JSON has no enums: a member of a string enum is its string value there (numeric enums take plain numbers already).
type Json<T> = T extends string ? `${T}`
  : T extends readonly (infer U)[] ? Json<U>[]
  : T extends object ? { [K in keyof T]: Json<T[K]> }
  : T;

// @grafana/schema has no type for a Prometheus query (the Prometheus plugin's package has it): a target must be a
// DataQuery (refId, datasource...), and its own fields (expr, legendFormat...) are not checked here.
type Target = Json<DataQuery> & Record<string, unknown>;

// A panel of a given type, with that plugin's options and custom field config. Grafana fills in the plugin's
// defaults (its panelcfg `defaultOptions` is a Partial<Options> too), so top-level options may be left out; what is
// given is checked in full.
type PanelOf<Kind extends string, Options, Custom = Record<string, unknown>> =
  Omit<Json<Panel>, "type" | "options" | "fieldConfig" | "targets"> & {
    type: Kind;
    options?: Json<Partial<Options>>;
    fieldConfig?: Json<FieldConfigSource<Partial<Custom>>>;
    targets?: Target[];
  };

// The panel types the dashboards use; a panel of another type fails until it is added here.
type VizPanel = PanelOf<"timeseries", timeseries.Options, timeseries.FieldConfig> | PanelOf<"stat", stat.Options>;
type Row = Omit<Json<RowPanel>, "panels"> & { panels: VizPanel[] };

export type Board = Omit<Json<Dashboard>, "panels"> & { panels?: Array<VizPanel | Row> };
