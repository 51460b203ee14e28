"""`mdpo sweep`: a grid of training runs (games x methods x extra axes x seeds) on one Ray cluster.

Every cell is one `mdpo train` subprocess with its own run directory

    RUNS_DIR/<game>/<method>[/<field>=<value>...]/seed<k>

attached with --ray-address to the sweep's cluster: the one given by --ray-address (or RAY_ADDRESS), else a
local Ray that the sweep starts and its cells share. Cells run at once while their Ray reservations (CPUs, and
GPUs and `learner` slots where the cluster has them, as the coordinator places them) fit in the cluster's
totals, so concurrent runs never wait on each other's actors; --max-concurrent caps that further.

A cell whose summary.json says completed is skipped; one with a config.json but no completed summary is resumed
with `mdpo train --resume` (restarted if it never wrote a checkpoint); a run directory made with a different
config is a conflict: reported, never overwritten. Failures are recorded in RUNS_DIR/sweep-status.json and shown
with the tail of the cell's train.log; the other cells go on.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

from learners.config import PRESETS, ConfigError, TrainConfig
from learners.runs import CELL_FILE, game_name

_FIELDS = {f.name: str(f.type) for f in fields(TrainConfig)}
METHODS: dict[str, dict] = {"mdpo": {"alpha": 1.0}, "ppo": {"alpha": 0.0}}
# Set per cell by the sweep; run_id (the Prometheus label) is the cell's name, so concurrent cells never share one.
MANAGED = tuple(f for f in ("env_id", "seed", "run_dir", "ray_address", "progress", "run_id") if f in _FIELDS)
# Defaults of a cell unless overridden: concurrent cells must not bind the same metrics ports.
CELL_DEFAULTS = {f: v for f, v in {"metrics_port": 0}.items() if f in _FIELDS}
# Fields that do not change what a run computes: may differ between a run directory's config and the sweep's.
RESUMABLE = {"run_dir", "ray_address", "progress", "checkpoint_every", "device", "run_id", "metrics_host",
             "metrics_port", "metrics_sd_dir"}
STATUS_FILE = "sweep-status.json"
LOG_FILE = "train.log"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _unknown_field(name: str, what: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_FIELDS), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown {what} {name!r}: it must be a TrainConfig field (see `mdpo train --help`).{hint}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_value(name: str, text: str, what: str = "field"):
    """A TrainConfig field's value from text, typed like the field."""
    if name not in _FIELDS:
        raise _unknown_field(name, what)
    convert = {"bool": _bool, "int": int, "float": float}.get(_FIELDS[name], str)
    try:
        return convert(text)
    except ValueError as err:
        raise ConfigError(f"{what} {name}: cannot read {text!r} as {_FIELDS[name]} ({err})") from None


def format_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Method:
    """A named set of config overrides, e.g. mdpo = alpha 1, ppo = alpha 0."""

    name: str
    overrides: dict

    @classmethod
    def parse(cls, spec: str) -> "Method":
        """`mdpo`, `ppo`, or `NAME:FIELD=VALUE[,FIELD=VALUE...]`."""
        name, colon, rest = spec.partition(":")
        if not colon:
            if name not in METHODS:
                raise ConfigError(f"unknown method {name!r}: the built-ins are mdpo (alpha 1) and ppo (alpha 0); "
                                  "define others as NAME:FIELD=VALUE[,FIELD=VALUE...], e.g. exact:distill_mode=exact")
            return cls(name, dict(METHODS[name]))
        if not _NAME.fullmatch(name):
            raise ConfigError(f"method name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        overrides = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"method {spec!r}: expected FIELD=VALUE, got {item!r}")
            overrides[key] = parse_value(key, value, f"method {name} field")
        return cls(name, overrides)


def parse_axis(spec: str) -> tuple[str, list]:
    """`FIELD=V1,V2,...` -> (field, typed values)."""
    name, eq, values = spec.partition("=")
    if not eq or not values:
        raise ConfigError(f"--axis expects FIELD=VALUE[,VALUE...], got {spec!r}")
    return name, [parse_value(name, v, "axis") for v in values.split(",")]


@dataclass
class SweepConfig:
    runs_dir: Path
    """One run directory per cell goes below this."""
    games: list[str]
    """Procgen games (or Gymnasium ids); `all` means the 16 Procgen games."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    methods: list[Method] = field(default_factory=lambda: [Method.parse("mdpo"), Method.parse("ppo")])
    axes: dict[str, list] = field(default_factory=dict)
    """Extra grid dimensions: TrainConfig field -> values."""
    preset: str | None = None
    """Named TrainConfig preset every cell starts from."""
    overrides: dict = field(default_factory=dict)
    """Fixed TrainConfig values for every cell (applied over the preset, under methods and axes)."""
    max_concurrent: int = 0
    """At most this many cells at once (0: as many as the cluster's resources allow)."""
    ray_address: str = ""
    """Cluster to run on; empty: RAY_ADDRESS, else a local Ray started by the sweep."""

    def validate(self) -> "SweepConfig":
        from actors.envs import PROCGEN_GAMES

        self.runs_dir = Path(self.runs_dir)
        if self.games == ["all"]:
            self.games = list(PROCGEN_GAMES)
        for what, items in (("--games", self.games), ("--seeds", self.seeds),
                            ("--methods", [m.name for m in self.methods])):
            if not items:
                raise ConfigError(f"{what} needs at least one value")
            if len(set(items)) != len(items):
                raise ConfigError(f"{what} lists a value twice: {items}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in self.overrides:
            if name not in _FIELDS:
                raise _unknown_field(name, "override")
            if name in MANAGED:
                raise ConfigError(f"{name} is set per cell by the sweep (use --games, --seeds, RUNS_DIR, --ray-address)")
        for name, values in self.axes.items():
            if name not in _FIELDS:
                raise _unknown_field(name, "axis")
            if name in MANAGED:
                raise ConfigError(f"axis {name!r} is managed by the sweep: games and seeds are --games and --seeds")
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"axis {name} needs distinct values, got {values}")
            if name in self.overrides:
                raise ConfigError(f"{name} is both an axis and a fixed override; keep one")
        for method in self.methods:
            for name in method.overrides:
                if name in MANAGED:
                    raise ConfigError(f"method {method.name} sets {name}, which the sweep sets per cell")
                if name in self.axes or name in self.overrides:
                    raise ConfigError(f"method {method.name} sets {name}, which is also an axis or a fixed override")
        if self.max_concurrent < 0:
            raise ConfigError(f"--max-concurrent must be >= 0 (0: as resources allow), got {self.max_concurrent}")
        return self


@dataclass
class Cell:
    name: str              # run directory relative to RUNS_DIR
    game: str
    method: str
    axes: dict
    seed: int
    run_dir: Path
    config: TrainConfig

    @property
    def label(self) -> str:
        return " ".join([self.method] + [f"{k}={format_value(v)}" for k, v in self.axes.items()])

    def describe(self) -> dict:
        return {"game": self.game, "method": self.method, "axes": self.axes, "seed": self.seed, "label": self.label}


def expand(sweep: SweepConfig) -> list[Cell]:
    """Every cell of the grid, seed-major (all games and methods of seed 1 first), each config validated."""
    base = dict(PRESETS[sweep.preset]) if sweep.preset else {}
    cells = []
    for seed, game, method in itertools.product(sweep.seeds, sweep.games, sweep.methods):
        for combo in itertools.product(*sweep.axes.values()):
            axes = dict(zip(sweep.axes, combo))
            parts = [game_name(game), method.name, *(f"{k}={format_value(v)}" for k, v in axes.items()), f"seed{seed}"]
            name = "/".join(parts)
            run_dir = sweep.runs_dir / name
            values = {**CELL_DEFAULTS, **base, **sweep.overrides, **method.overrides, **axes,
                      "env_id": game, "seed": seed, "run_dir": str(run_dir), "progress": False}
            if "run_id" in _FIELDS:
                values["run_id"] = name.replace("/", "-")
            if "metrics_sd_dir" in _FIELDS and "metrics_sd_dir" not in sweep.overrides:
                values["metrics_sd_dir"] = str(sweep.runs_dir / "prometheus")   # one file_sd folder per sweep
            try:
                config = TrainConfig(**values).validate()
            except ConfigError as err:
                raise ConfigError(f"cell {name}: {err}") from None
            cells.append(Cell(name, game_name(game), method.name, axes, seed, run_dir, config))
    return cells


def cell_status(cell: Cell) -> tuple[str, str]:
    """("new" | "resume" | "done" | "conflict", reason)."""
    config_path = cell.run_dir / "config.json"
    if not config_path.exists():
        return "new", ""
    try:
        saved = json.loads(config_path.read_text())
    except ValueError:
        return "conflict", f"{config_path} is not valid JSON; move the directory away to rerun the cell"
    wanted = cell.config.to_dict()
    diffs = sorted(k for k in set(saved) | set(wanted) if k not in RESUMABLE and saved.get(k) != wanted.get(k))
    if diffs:
        shown = ", ".join(f"{k}={saved.get(k)!r} (sweep: {wanted.get(k)!r})" for k in diffs[:4])
        return "conflict", (f"{cell.run_dir} was made with a different config: {shown}; "
                            "use another RUNS_DIR or the sweep's original settings")
    try:
        summary = json.loads((cell.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("completed") is True:
        return "done", "completed earlier"
    if not any((cell.run_dir / "checkpoints").glob("ckpt-*/manifest.json")):
        return "new", "no checkpoint to resume from; starting over"
    return "resume", "interrupted earlier"


def train_command(cell: Cell, ray_address: str, resume: bool) -> list[str]:
    """The `mdpo train` command line of a cell: every value that differs from TrainConfig's defaults."""
    cmd = [sys.executable, "-m", "learners.cli", "train"]
    if resume:
        return cmd + ["--resume", str(cell.run_dir), "--ray-address", ray_address, "--progress", "false"]
    defaults = TrainConfig().to_dict()
    for name, value in cell.config.to_dict().items():
        if name not in ("ray_address", "progress") and (value != defaults[name] or name in MANAGED):
            cmd += [f"--{name.replace('_', '-')}", format_value(value)]
    return cmd + ["--ray-address", ray_address, "--progress", "false"]


def cell_resources(cfg: TrainConfig, cluster: dict[str, float]) -> dict[str, float]:
    """What a run reserves on the cluster, placed as the coordinator places it (evaluators reserve nothing)."""
    need = {"CPU": cfg.num_learners * (cfg.learner_cpus + cfg.num_actors * cfg.actor_cpus)}
    if cfg.device != "cpu" and cluster.get("GPU", 0) >= cfg.num_learners:
        need["GPU"] = float(cfg.num_learners)
    if cluster.get("learner", 0) >= cfg.num_learners:
        need["learner"] = float(cfg.num_learners)
    return need


def fits(need: dict[str, float], used: dict[str, float], total: dict[str, float]) -> bool:
    return all(used.get(k, 0.0) + v <= total.get(k, 0.0) + 1e-9 for k, v in need.items())


@dataclass
class CellState:
    cell: Cell
    status: str                 # pending, running, done, skipped, failed, interrupted
    reason: str = ""
    resume: bool = False
    exit_code: int | None = None
    started: float | None = None
    ended: float | None = None
    need: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def record(self) -> dict:
        return {"cell": self.cell.name, **self.cell.describe(), "status": self.status, "reason": self.reason,
                "resumed": self.resume, "exit_code": self.exit_code, "started": self.started, "ended": self.ended,
                "log": str(self.cell.run_dir / LOG_FILE)}


class SweepRunner:
    def __init__(self, sweep: SweepConfig, out: TextIO | None = None, poll_seconds: float = 0.5):
        self.sweep = sweep.validate()
        self.out = out or sys.stdout
        self.poll_seconds = poll_seconds
        self.states: list[CellState] = []
        self.max_running = 0
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ output
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def progress(self, event: str = "") -> None:
        count = {s: sum(st.status == s for st in self.states) for s in
                 ("done", "skipped", "running", "failed", "pending", "interrupted")}
        line = (f"sweep: {count['done'] + count['skipped']}/{len(self.states)} done ({count['skipped']} skipped) | "
                f"{count['running']} running | {count['failed']} failed | {count['pending']} pending")
        if count["interrupted"]:
            line += f" | {count['interrupted']} interrupted"
        self.say(line + (f" | {event}" if event else ""))
        self.write_status()

    def write_status(self) -> None:
        data = {"runs_dir": str(self.sweep.runs_dir), "max_running": self.max_running,
                "cells": [st.record() for st in self.states]}
        path = self.sweep.runs_dir / STATUS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)

    # --------------------------------------------------------------- the sweep
    def run(self) -> int:
        """Run every cell that is not done; 0 if all are done, 1 if any failed, 128+signal if stopped."""
        cells = expand(self.sweep)
        self.sweep.runs_dir.mkdir(parents=True, exist_ok=True)
        for cell in cells:
            status, reason = cell_status(cell)
            state = {"done": "skipped", "conflict": "failed"}.get(status, "pending")
            self.states.append(CellState(cell, state, reason, resume=status == "resume"))
        pending = [st for st in self.states if st.status == "pending"]
        self.say(f"sweep: {len(cells)} cells in {self.sweep.runs_dir}: {len(pending)} to run "
                 f"({sum(st.resume for st in pending)} to resume), "
                 f"{sum(st.status == 'skipped' for st in self.states)} already done")
        self.progress()
        if pending:
            self._run_pending(pending)
        self._report_failures()
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        return 1 if any(st.status == "failed" for st in self.states) else 0

    def _connect(self, pending: list[CellState]) -> tuple[str, dict]:
        import ray

        address = self.sweep.ray_address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address, log_to_driver=False)
            return address, ray.cluster_resources()
        # Like `mdpo train` alone, a local cluster is sized so that any single cell fits.
        biggest = max(cell_resources(st.cell.config, {})["CPU"] for st in pending)
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(biggest)), include_dashboard=False, log_to_driver=False)
        return ray.get_runtime_context().gcs_address, ray.cluster_resources()

    def _run_pending(self, pending: list[CellState]) -> None:
        import ray

        address, total = self._connect(pending)
        self.say(f"sweep: cluster {address}: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")
        for st in pending:
            st.need = cell_resources(st.cell.config, total)
            if not fits(st.need, {}, total):
                st.status, st.reason = "failed", f"needs {st.need} but the whole cluster has {total}"
        handlers = self._install_signal_handlers()
        try:
            while True:
                self._launch(total, address)
                running = [st for st in self.states if st.status == "running"]
                if not running:
                    break
                time.sleep(self.poll_seconds)
                for st in running:
                    if st.process.poll() is not None:
                        self._finish(st)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            ray.shutdown()

    def _launch(self, total: dict, address: str) -> None:
        if self.stop_signal is not None:
            return
        for st in self.states:
            running = [s for s in self.states if s.status == "running"]
            if st.status != "pending":
                continue
            if self.sweep.max_concurrent and len(running) >= self.sweep.max_concurrent:
                return
            used = {k: sum(s.need.get(k, 0.0) for s in running) for k in total}
            if not fits(st.need, used, total):
                continue
            self._start(st, address)

    def _start(self, st: CellState, address: str) -> None:
        cell = st.cell
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / CELL_FILE).write_text(json.dumps(cell.describe(), indent=1) + "\n")
        cmd = train_command(cell, address, st.resume)
        log = open(cell.run_dir / LOG_FILE, "a")
        log.write(f"=== mdpo sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        log.flush()
        # A session of its own: a terminal's Ctrl-C reaches only the sweep, which forwards one SIGTERM.
        st.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        log.close()
        st.status, st.started = "running", time.time()
        self.max_running = max(self.max_running, sum(s.status == "running" for s in self.states))
        self.progress(f"{'resumed' if st.resume else 'started'} {cell.name}")

    def _finish(self, st: CellState) -> None:
        st.exit_code, st.ended = st.process.returncode, time.time()
        st.process = None
        completed = cell_status(st.cell)[0] == "done"
        if st.exit_code == 0 and completed:
            st.status, st.reason = "done", f"finished in {st.ended - st.started:.0f}s"
        elif self.stop_signal is not None and st.exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            st.status, st.reason = "interrupted", "stopped with a checkpoint; rerun the sweep to resume"
        elif st.exit_code == 0:
            st.status, st.reason = "failed", "exited 0 but summary.json does not say completed"
        else:
            st.status, st.reason = "failed", f"mdpo train exited with code {st.exit_code}"
        self.progress(f"{st.status} {st.cell.name}")

    def _install_signal_handlers(self) -> dict:
        def on_signal(signum, frame):
            running = [st for st in self.states if st.status == "running"]
            if self.stop_signal is None:
                self.stop_signal = signum
                self.say(f"sweep: signal {signum}: stopping {len(running)} running cells (each writes a checkpoint); "
                         "rerun the same command to resume")
                for st in running:
                    st.process.send_signal(signal.SIGTERM)
            else:
                for st in running:
                    st.process.kill()

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except ValueError:   # not the main thread: the caller handles signals
                pass
        return previous

    def _report_failures(self) -> None:
        for st in self.states:
            if st.status != "failed":
                continue
            self.say(f"FAILED {st.cell.name}: {st.reason}")
            log = st.cell.run_dir / LOG_FILE
            if st.exit_code is not None and log.exists():
                tail = log.read_text(errors="replace").splitlines()[-12:]
                self.say("\n".join(f"    {line}" for line in tail))
                self.say(f"    (full log: {log})")
