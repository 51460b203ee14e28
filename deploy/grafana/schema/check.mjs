// Checks dashboard JSON files against Grafana's schema:  node check.mjs FILE.json...
//
// Each file becomes a TypeScript module `export const board: Board = <the JSON>` (Board: types.ts) and tsc
// type-checks them all. A literal, not an imported .json: only a literal gets excess-property checking (unknown
// fields) and keeps its strings literal (enum values). The JSON starts on the module's second line, so an error
// at line L of the module is reported at line L - 1 of the JSON file. Exit status: tsc's (0: every file matches).
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const files = process.argv.slice(2).map((f) => resolve(f));
if (files.length === 0) {
  console.error("usage: node check.mjs DASHBOARD.json...");
  process.exit(2);
}
const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
const schema = JSON.parse(readFileSync(join(here, "node_modules", "@grafana", "schema", "package.json"), "utf8"));

// Under node_modules (git-ignored), where `@grafana/schema` resolves; one directory per run.
mkdirSync(join(here, "node_modules", ".cache"), { recursive: true });
const work = mkdtempSync(join(here, "node_modules", ".cache", "mdpo-schema-check-"));
const modules = new Map();
try {
  files.forEach((file, i) => {
    const text = readFileSync(file, "utf8");
    JSON.parse(text); // plain JSON only: the check is of a dashboard, not of TypeScript that happens to parse
    const name = `${i}-${basename(file, ".json")}.ts`;
    const types = relative(work, join(here, "types")).split("\\").join("/");
    writeFileSync(join(work, name), `import type { Board } from "${types}";\nexport const board: Board = ${text}`);
    modules.set(name, relative(process.cwd(), file) || file);
  });
  writeFileSync(join(work, "tsconfig.json"),
    JSON.stringify({ extends: join(here, "tsconfig.json"), files: [...modules.keys()] }));
  const run = spawnSync(process.execPath, [tsc, "-p", "tsconfig.json", "--pretty", "false"],
    { cwd: work, encoding: "utf8" });
  if (run.error) throw run.error;
  const out = (run.stdout + run.stderr).replace(/^(\d+-[^(\s]+\.ts)\((\d+),(\d+)\)/gm,
    (all, name, line, col) => modules.has(name) ? `${modules.get(name)}(${line - 1},${col})` : all);
  process.stdout.write(out);
  if (run.status === 0) {
    console.log(`ok: ${files.length} dashboard(s) match @grafana/schema ${schema.version}`);
  }
  process.exitCode = run.status ?? 1;
} finally {
  rmSync(work, { recursive: true, force: true });
}
