"""Builds the "MDPO training" Grafana dashboard, provisioning/dashboards/mdpo-training.json, with Grafana's SDK for
dashboards as code (grafana-foundation-sdk, the `grafana` extra: a deploy-time dependency, mdpo never imports this).

    pip install -e ".[grafana]"
    python deploy/grafana/dashboard.py          # rewrite the JSON after editing PANELS below

The JSON is committed (Grafana provisions it as is); tests/test_monitoring.py checks that it matches this script,
that every metric its queries name is exported by learners/telemetry/, and that every query returns data from a
real Prometheus scraping a real training run; tests/test_grafana_schema.py checks it against Grafana's published
dashboard schema (@grafana/schema, deploy/grafana/schema/).

Queries may use the dashboard variables `$run_id` (multi-select, `.*` for all) and Grafana's
`$__rate_interval`; nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries
    from grafana_foundation_sdk.builders import dashboard as board
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as c
    from grafana_foundation_sdk.models import dashboard as d
except ImportError as err:                      # deploy-time only: not in mdpo's runtime dependencies
    raise ImportError(f'{err}: install Grafana\'s SDK with `pip install -e ".[grafana]"`') from err

OUT = Path(__file__).resolve().parent / "provisioning" / "dashboards" / "mdpo-training.json"
DS = d.DataSourceRef(type_val="prometheus", uid="${datasource}")
RI = "[$__rate_interval]"
RUN_IDS = "label_values(mdpo_coordinator_iteration, run_id)"


def sel(metric: str, extra: str = "") -> str:
    """metric{run_id=~"$run_id", extra}"""
    return f'{metric}{{run_id=~"$run_id"{", " + extra if extra else ""}}}'


def rate(metric: str, by: str, extra: str = "") -> str:
    return f"sum by ({by}) (rate({sel(metric, extra)}{RI}))"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({sel(metric + '_bucket')}{RI})))"


def mean_of(metric: str, by: str) -> str:
    """Mean observation over the window, from a histogram's or summary's _sum and _count."""
    return f"{rate(metric + '_sum', by)} / {rate(metric + '_count', by)}"


# (row title, [(panel title, type, unit, description, [(expr, legend)])])
PANELS: list[tuple[str, list[tuple[str, str, str, str, list[tuple[str, str]]]]]] = [
    ("Is it learning? Is it generalizing?", [
        ("Train vs test return per agent", "timeseries", "none",
         "Train: mean return of the last --return-window training-level episodes. Test: mean return of the latest "
         "evaluation on unseen levels (num_levels=0).",
         [(sel("mdpo_coordinator_train_return"), "train · agent {{learner_id}}"),
          (sel("mdpo_coordinator_test_return"), "test · agent {{learner_id}}")]),
        ("Generalization gap (train − test)", "timeseries", "none",
         "Train return minus test return per agent; mutual distillation should keep it small.",
         [(sel("mdpo_coordinator_generalization_gap"), "agent {{learner_id}}")]),
        ("Training episodes: mean return and length", "timeseries", "none",
         "From the rollout actors, over the rate window: mean raw return and mean length of finished episodes.",
         [(mean_of("mdpo_actor_episode_return", "run_id, learner_id"), "return · agent {{learner_id}}"),
          (mean_of("mdpo_actor_episode_length_steps", "run_id, learner_id"), "length · agent {{learner_id}}")]),
        ("Evaluations: duration and weights age", "timeseries", "short",
         "Mean wall time of an evaluation (s), and how many optimizer steps the last evaluated weights are behind "
         "the learner's.",
         [(mean_of("mdpo_evaluator_evaluation_seconds", "run_id, learner_id"), "duration (s) · agent {{learner_id}}"),
          (f"max by (run_id, learner_id) ({sel('mdpo_learner_weights_version')}) - on (run_id, learner_id) "
           f"max by (run_id, learner_id) ({sel('mdpo_evaluator_weights_version')})", "weights age · agent {{learner_id}}")]),
    ]),
    ("Is it fast?", [
        ("Environment steps per second", "timeseries", "short",
         "Per agent, from the actors' step counters; and the run's average over all agents since it (re)started.",
         [(rate("mdpo_actor_env_steps_total", "run_id, learner_id"), "agent {{learner_id}}"),
          (sel("mdpo_coordinator_env_steps_per_second"), "run average, all agents")]),
        ("Progress", "stat", "percentunit", "Iterations done out of the iterations planned.",
         [(f"max by (run_id) ({sel('mdpo_coordinator_iteration')}) / "
           f"max by (run_id) ({sel('mdpo_coordinator_iterations_planned')})", "{{run_id}}")]),
        ("Environment steps per agent", "stat", "short", "Training-level environment steps taken by each agent.",
         [(sel("mdpo_coordinator_env_steps_total"), "agent {{learner_id}}")]),
        ("Iteration time", "timeseries", "s", "Wall time of one iteration (rollouts, PPO epochs, syncs).",
         [(quantile(0.5, "mdpo_coordinator_iteration_seconds", "run_id"), "p50"),
          (quantile(0.9, "mdpo_coordinator_iteration_seconds", "run_id"), "p90")]),
        ("Learner time per phase", "timeseries", "percentunit",
         "Share of wall time each learner spends waiting for rollouts, training, and syncing with its peer.",
         [(rate("mdpo_learner_phase_seconds_sum", "run_id, learner_id, phase"), "agent {{learner_id}} · {{phase}}")]),
        ("Actors: rollout time and inference share", "timeseries", "s",
         "p90 wall time of one rollout, and the share of it spent in policy inference (right axis).",
         [(quantile(0.9, "mdpo_actor_rollout_seconds", "run_id, learner_id"), "rollout p90 · agent {{learner_id}}"),
          (f"{rate('mdpo_actor_inference_seconds_sum', 'run_id, learner_id')} / "
           f"{rate('mdpo_actor_rollout_seconds_sum', 'run_id, learner_id')}", "inference share · agent {{learner_id}}")]),
        ("Samples trained per second", "timeseries", "short", "Samples per second through the PPO epochs.",
         [(rate("mdpo_learner_samples_trained_total", "run_id, learner_id"), "agent {{learner_id}}")]),
        ("Weights version lag", "timeseries", "short",
         "Optimizer steps between the weights an actor collected with and its learner's weights when trained on.",
         [(f"max by (run_id, learner_id, actor_id) ({sel('mdpo_actor_weights_version_lag')})",
           "actor {{learner_id}}/{{actor_id}}")]),
    ]),
    ("Losses", [
        ("Policy and value loss", "timeseries", "none", "PPO clipped policy loss and value loss, iteration means.",
         [(sel("mdpo_learner_policy_loss"), "policy · agent {{learner_id}}"),
          (sel("mdpo_learner_value_loss"), "value · agent {{learner_id}}")]),
        ("Entropy", "timeseries", "none", "Policy entropy (nats); log(15) = 2.71 is uniform over Procgen's actions.",
         [(sel("mdpo_learner_entropy"), "agent {{learner_id}}")]),
        ("Approx KL to old policy and clip fraction", "timeseries", "none",
         "How far each PPO update moved the policy from the one that collected the data.",
         [(sel("mdpo_learner_approx_kl"), "approx KL · agent {{learner_id}}"),
          (sel("mdpo_learner_clip_fraction"), "clip fraction · agent {{learner_id}}")]),
        ("Explained variance", "timeseries", "none", "Of the returns by the value head (1 is perfect).",
         [(sel("mdpo_learner_explained_variance"), "agent {{learner_id}}")]),
        ("Gradient norm (before clipping)", "timeseries", "none", "Mean over the iteration's minibatches.",
         [(sel("mdpo_learner_grad_norm"), "agent {{learner_id}}")]),
        ("Learning rate", "timeseries", "none", "Adam learning rate (annealed with --anneal-lr).",
         [(sel("mdpo_learner_learning_rate"), "agent {{learner_id}}")]),
    ]),
    ("Distillation", [
        ("KL to peer", "timeseries", "none", "KL(peer || self) in nats: the distillation term before alpha.",
         [(sel("mdpo_learner_kl_peer"), "agent {{learner_id}}")]),
        ("Sync latency", "timeseries", "s", "Time of one sync: states to the peer, its logits back.",
         [(quantile(0.5, "mdpo_distill_sync_seconds", "run_id, learner_id"), "p50 · agent {{learner_id}}"),
          (quantile(0.99, "mdpo_distill_sync_seconds", "run_id, learner_id"), "p99 · agent {{learner_id}}")]),
        ("Sync traffic", "timeseries", "Bps", "Distillation bytes per second sent to and received from peers.",
         [(rate("mdpo_distill_sent_bytes_total", "run_id, learner_id"), "sent · agent {{learner_id}}"),
          (rate("mdpo_distill_received_bytes_total", "run_id, learner_id"), "received · agent {{learner_id}}")]),
        ("Peer logits staleness", "timeseries", "short",
         "Optimizer steps since the peer logits used as targets were made (0 with --sync minibatch).",
         [(sel("mdpo_distill_staleness_steps"), "mean · agent {{learner_id}}"),
          (sel("mdpo_distill_staleness_max_steps"), "max · agent {{learner_id}}")]),
        ("gRPC calls by status code", "timeseries", "reqps",
         "Calls per second on the learners' Distill/health services, server and client side, by final status.",
         [(rate("mdpo_grpc_server_handled_total", "run_id, grpc_method, grpc_code"), "server {{grpc_method}} {{grpc_code}}"),
          (rate("mdpo_grpc_client_handled_total", "run_id, grpc_method, grpc_code"), "client {{grpc_method}} {{grpc_code}}")]),
        ("gRPC server handling time", "timeseries", "s", "p99 time the learners' servers spend on one call, by method.",
         [(quantile(0.99, "mdpo_grpc_server_handling_seconds", "run_id, grpc_method"), "p99 {{grpc_method}}")]),
    ]),
    ("Is anything broken?", [
        ("Processes up", "timeseries", "short", "Scrape targets answering, by role (Prometheus' `up`).",
         [(f"sum by (run_id, role) ({sel('up')})", "{{role}}")]),
        ("Live workers (Ray GCS) vs started", "timeseries", "short",
         "Ray actors of each kind alive according to Ray, against the number the run started.",
         [(sel("mdpo_coordinator_live_workers"), "live {{kind}}"),
          (sel("mdpo_coordinator_expected_workers"), "started {{kind}}")]),
        ("Seconds since last progress", "stat", "s", "Alert MDPONoTrainingProgress fires above 300 s.",
         [(f"time() - max by (run_id) ({sel('mdpo_coordinator_last_progress_timestamp_seconds')})", "{{run_id}}")]),
        ("Restarts and recovered failures", "timeseries", "short",
         "Ray restarts of each rollout actor, and failures the coordinator recovered from via a checkpoint.",
         [(f"max by (run_id, learner_id, actor_id) ({sel('mdpo_actor_restarts_total')})",
           "actor {{learner_id}}/{{actor_id}} restarts"),
          (sel("mdpo_coordinator_recovered_failures_total"), "recovered failures")]),
        ("Non-finite updates", "timeseries", "short", "Updates aborted on a NaN/inf loss, gradient or peer logits.",
         [(f"sum by (run_id, learner_id) ({sel('mdpo_learner_nonfinite_errors_total')})", "agent {{learner_id}}")]),
        ("Memory", "timeseries", "bytes", "Learners: memory on the training device. Every process: resident memory.",
         [(sel("mdpo_learner_device_memory_bytes"), "learner {{learner_id}} ({{device}})"),
          (sel("process_resident_memory_bytes"), "RSS {{instance}}")]),
    ]),
    # Last, so the rows above keep their panel ids and places. Measured by the driver on a fixed probe set of states
    # at some evaluations, for agents of one weights version: the series step from one measurement to the next.
    ("Mechanism (probe set)", [
        ("Robustness: action TV between renderings", "timeseries", "none",
         "Mean total-variation distance (0 to 1) between an agent's action distributions on two renderings of the "
         "same states, per rendering variant; lower is more robust. Procgen only.",
         [(sel("mdpo_probe_robustness_tv"), "agent {{learner_id}} · {{variant}}")]),
        ("Render CKA: features across renderings", "timeseries", "none",
         "Linear CKA between an agent's encoder features of two renderings of the same states, per variant; 1 is "
         "the same representation up to rotation and scale. Procgen only.",
         [(sel("mdpo_probe_render_cka"), "agent {{learner_id}} · {{variant}}")]),
        ("Agreement: action TV between agents", "timeseries", "none",
         "Mean total-variation distance (0 to 1) between two agents' action distributions on the same states; "
         "lower is more agreement.",
         [(sel("mdpo_probe_agreement_tv"), "agents {{learner_a}}–{{learner_b}}")]),
        ("CKA between agents", "timeseries", "none",
         "Linear CKA between two agents' encoder features on the same states; 1 is the same representation up to "
         "rotation and scale.",
         [(sel("mdpo_probe_cka"), "agents {{learner_a}}–{{learner_b}}")]),
        ("Probe: weights version measured", "stat", "short",
         "Weights version (optimizer steps) of the agents the last probe measurement is of.",
         [(sel("mdpo_probe_weights_version"), "{{run_id}}")]),
    ]),
]


def _target(i: int, expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DS).expr(expr).legend_format(legend).range()


def _panel(pid: int, title: str, kind: str, unit: str, description: str, targets, grid: d.GridPos):
    if kind == "timeseries":
        panel = (timeseries.Panel()
                 .legend(common.VizLegendOptions().display_mode(c.LegendDisplayMode.LIST)
                         .placement(c.LegendPlacement.BOTTOM).show_legend(True))
                 .tooltip(common.VizTooltipOptions().mode(c.TooltipDisplayMode.MULTI).sort(c.SortOrder.NONE)))
        if title.startswith("Actors: rollout time"):   # the share goes on its own axis
            panel.override_by_regexp("inference share.*", [
                d.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                d.DynamicConfigValue(id_val="unit", value="percentunit")])
    else:
        panel = (stat.Panel()
                 .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
                 .color_mode(c.BigValueColorMode.VALUE).graph_mode(c.BigValueGraphMode.AREA)
                 .text_mode(c.BigValueTextMode.AUTO))
        if title == "Seconds since last progress":
            panel.thresholds(board.ThresholdsConfig().mode(d.ThresholdsMode.ABSOLUTE).steps([
                d.Threshold(color="green", value=None), d.Threshold(color="orange", value=120),
                d.Threshold(color="red", value=300)]))
    panel.id(pid).title(title).description(description).datasource(DS).grid_pos(grid).unit(unit)
    for i, (expr, legend) in enumerate(targets):
        panel.with_target(_target(i, expr, legend))
    return panel


def _variables() -> list:
    datasource = (board.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
                  .current(d.VariableOption(selected=True, text="Prometheus", value="mdpo-prometheus"))
                  .multi(False).include_all(False).regex(""))
    model = datasource.build()                  # its builder has no refresh or options; the SDK's model has both
    model.refresh, model.options = d.VariableRefresh.ON_DASHBOARD_LOAD, []
    run_id = (board.QueryVariable("run_id").label("Run").datasource(DS)
              .query({"query": RUN_IDS, "refId": "run_id"})
              .current(d.VariableOption(selected=True, text=["All"], value=["$__all"]))
              .multi(True).include_all(True).all_value(".*").refresh(d.VariableRefresh.ON_TIME_RANGE_CHANGED)
              .sort(d.VariableSort.ALPHABETICAL_ASC).options([]).regex(""))
    for variable in (datasource, run_id):
        # The SDK gives every variable an interval variable's auto/auto_min/auto_count; they are not in Grafana's
        # schema of a variable, and left unset the SDK writes none of them.
        model = variable.build()
        model.auto = model.auto_min = model.auto_count = None
    return [datasource, run_id]


# Grafana's own "Annotations & Alerts" query, as Grafana writes it into every dashboard.
BUILT_IN_ANNOTATIONS = d.AnnotationQuery(name="Annotations & Alerts", type_val="dashboard", enable=True, hide=True,
                                         datasource=d.DataSourceRef(type_val="grafana", uid="-- Grafana --"),
                                         icon_color="rgba(0, 211, 255, 1)", built_in=1)


def build() -> d.Dashboard:
    """The dashboard as the SDK's model (render() writes it)."""
    dash = (board.Dashboard("MDPO training").uid("mdpo-training")
            .description("Is it learning, is it generalizing, is it fast, is anything broken? "
                         "(mdpo, learners/telemetry/)")
            .tags(["mdpo", "reinforcement-learning"]).timezone("browser").editable()
            .tooltip(d.DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-1h", "now").version(1).links([])
            .variables(_variables()))
    pid, y = 1, 0
    for row_title, row in PANELS:
        # Rows stay open, their panels after them at the top level (the SDK's Row.with_panel would collapse it).
        dash.with_row(board.Row(row_title).id(pid).collapsed(False).grid_pos(d.GridPos(h=1, w=24, x=0, y=y)))
        pid, y, x = pid + 1, y + 1, 0
        for title, kind, unit, description, targets in row:
            w, h = (6, 5) if kind == "stat" else (8, 8)
            if x + w > 24:
                x, y = 0, y + 8
            dash.with_panel(_panel(pid, title, kind, unit, description, targets, d.GridPos(h=h, w=w, x=x, y=y)))
            pid, x = pid + 1, x + w
        y += 8
    model = dash.build()
    model.annotations.list_val = [BUILT_IN_ANNOTATIONS]   # the SDK's AnnotationQuery builder cannot say builtIn
    return model


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
