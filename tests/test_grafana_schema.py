"""The Grafana dashboard against Grafana's own schema: the TypeScript types of @grafana/schema (generated from
Grafana's CUE schema), checked by tsc through deploy/grafana/schema/check.mjs, with the versions its package-lock.json
pins (`npm ci`, run here when node_modules is missing or out of date)."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import system_tool

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO / "deploy" / "grafana" / "schema"
DASHBOARD = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "mdpo-training.json"
STAMP = SCHEMA_DIR / "node_modules" / ".mdpo-installed"   # what node_modules was installed from


def node_tool(name: str) -> str:
    return system_tool(name, "Debian packages nodejs and npm")


def wanted() -> str:
    files = ("package.json", "package-lock.json")
    return hashlib.sha256(b"".join((SCHEMA_DIR / f).read_bytes() for f in files)).hexdigest()


@pytest.fixture(scope="module")
def check():
    """Runs check.mjs on some dashboard files; node_modules is (re)installed first if it is not the lock file's."""
    node, npm = node_tool("node"), node_tool("npm")
    # Another test run in this checkout may be installing too: one `npm ci` at a time.
    lock = Path(tempfile.gettempdir()) / f"mdpo-grafana-schema-{hashlib.sha256(bytes(SCHEMA_DIR)).hexdigest()[:8]}.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not STAMP.exists() or STAMP.read_text() != wanted():
            proc = subprocess.run([npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--ignore-scripts",
                                   "--loglevel=error"], cwd=SCHEMA_DIR, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"npm ci failed in {SCHEMA_DIR}:\n{proc.stdout}\n{proc.stderr}"
            STAMP.write_text(wanted())

    def run(*files: Path) -> subprocess.CompletedProcess:
        with open(lock, "w") as held:                   # not while another run reinstalls node_modules
            fcntl.flock(held, fcntl.LOCK_SH)
            return subprocess.run([node, "check.mjs", *map(str, files)], cwd=SCHEMA_DIR, capture_output=True,
                                  text=True, timeout=120)
    return run


def test_the_dashboard_matches_grafanas_schema(check):
    proc = check(DASHBOARD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pinned = json.loads((SCHEMA_DIR / "package-lock.json").read_text())["packages"]["node_modules/@grafana/schema"]
    assert proc.stdout.strip() == f"ok: 1 dashboard(s) match @grafana/schema {pinned['version']}"


def first_panel(board: dict, kind: str) -> dict:
    return next(p for p in board["panels"] if p["type"] == kind)


# name: (how it breaks the dashboard, the line of the JSON to blame, what tsc says there)
BREAKAGES = {
    "string-height": (lambda b: first_panel(b, "timeseries")["gridPos"].update(h="8"), '"h": "8"',
                      "Type 'string' is not assignable to type 'number'"),
    "unknown-field": (lambda b: b.update(colour="blue"), '"colour": "blue"',
                      "'\"colour\"' does not exist in type 'Board'"),
    "misspelt-field": (lambda b: first_panel(b, "stat").update(gridpos=first_panel(b, "stat").pop("gridPos")),
                       '"gridpos": {', "'\"gridpos\"' does not exist"),
    "not-an-enum-value": (lambda b: first_panel(b, "stat")["options"].update(colorMode="rainbow"),
                          '"colorMode": "rainbow"', "Type '\"rainbow\"' is not assignable to type"),
    "missing-refid": (lambda b: first_panel(b, "timeseries")["targets"][0].pop("refId"), '"expr": ',
                      "Property 'refId' is missing"),
    "unknown-panel-type": (lambda b: first_panel(b, "stat").update(type="graph"), '"type": "graph"',
                           "Type '\"graph\"' is not assignable to type '\"timeseries\" | \"stat\" | \"row\"'"),
}


def test_the_check_rejects_what_grafanas_schema_does_not_allow(check, tmp_path):
    """Each file breaks the dashboard one way; tsc must blame that file at the line of the break (check.mjs maps
    its positions back to the JSON)."""
    board, files, blame = json.loads(DASHBOARD.read_text()), [], {}
    for name, (breakage, line_text, _) in BREAKAGES.items():
        broken = copy.deepcopy(board)
        breakage(broken)
        text = json.dumps(broken, indent=2)
        lines = text.splitlines()
        # the broken line; for a missing field, the object's first line that is left (where tsc points)
        blame[name] = next(i for i, line in enumerate(lines, 1) if line.strip().startswith(line_text))
        if name == "missing-refid":
            blame[name] -= 1                                           # tsc points at the object's `{`
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(text)
    proc = check(*files)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ok:" not in output, output
    diagnostics = re.split(r"\n(?=\S)", output)                      # tsc indents a diagnostic's details
    for name, (_, _, message) in BREAKAGES.items():
        reported = [diagnostic for diagnostic in diagnostics if f"{name}.json(" in diagnostic]
        assert reported, f"{name}: not reported\n{output}"
        assert any(message in diagnostic and f"{name}.json({blame[name]}," in diagnostic for diagnostic in reported), \
            f"{name}: expected {message!r} at line {blame[name]}, got:\n" + "\n".join(reported)
