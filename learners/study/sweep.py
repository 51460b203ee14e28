"""`mdpo sweep`'s grid: games x methods x extra axes x seeds, one `mdpo train` run directory per cell,

    RUNS_DIR/<game>/<method>[/<field>=<value>...]/seed<k>

and what each cell's directory says about it. A cell whose summary.json says completed is done (skipped); one
with a config.json but no completed summary is resumed with `mdpo train --resume` (restarted if it never wrote
a checkpoint); a directory made with a different config is a conflict: reported, never overwritten.
Running the cells is learners/study/sweep_runner.py.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from learners.config import FIELD_TYPES, PLACEMENT_FIELDS, PRESETS, ConfigError, TrainConfig, field_parser
from learners.study.runs import game_name

_FIELDS = FIELD_TYPES
# mdpo: the authors' objective (trainer.py: the KL gradient flows into both networks); dml: classic deep mutual
# learning (the peer's output a fixed target); ppo: the authors' ppo.py baseline (alpha 0: one agent's loss, not
# halved). The sweep's default methods are mdpo and ppo, the paper's comparison.
METHODS: dict[str, dict] = {"mdpo": {"alpha": 1.0, "distill_mode": "exact"}, "dml": {"alpha": 1.0, "distill_mode": "detached"},
                            "ppo": {"alpha": 0.0}}
# Set per cell by the sweep; run_id (the Prometheus label) is the cell's name, so concurrent cells never share one.
MANAGED = tuple(f for f in ("env_id", "seed", "run_dir", "ray_address", "progress", "run_id") if f in _FIELDS)
# Defaults of a cell unless overridden: concurrent cells must not bind the same metrics ports.
CELL_DEFAULTS = {f: v for f, v in {"metrics_port": 0}.items() if f in _FIELDS}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _unknown_field(name: str, what: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_FIELDS), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown {what} {name!r}: it must be a TrainConfig field (see `mdpo train --help`).{hint}")


def parse_value(name: str, text: str, what: str = "field"):
    """A TrainConfig field's value from text, typed like the field."""
    if name not in _FIELDS:
        raise _unknown_field(name, what)
    try:
        return field_parser(name)(text)
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
                raise ConfigError(f"unknown method {name!r}: the built-ins are mdpo (alpha 1, exact), dml (alpha 1, "
                                  "detached) and ppo (alpha 0); "
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
        backends = [self.overrides.get("backend"), *self.axes.get("backend", []),
                    *(m.overrides.get("backend") for m in self.methods)]
        if "local" in backends:      # every cell joins the sweep's Ray cluster (--ray-address)
            raise ConfigError("a sweep runs its cells on a Ray cluster: drop --backend local (it is for one run in "
                              "one process: mdpo train --backend local)")
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
                # Beside RUNS_DIR, as a single run's is beside its run directory: runs/study -> runs/prometheus,
                # the folder deploy/prometheus/ watches.
                values["metrics_sd_dir"] = str(sweep.runs_dir.parent / "prometheus")
            if values.get("track"):
                # W&B groups and MLflow parent runs gather a cell's seeds; every cell's MLflow runs go to one store.
                values.setdefault("track_group", "/".join([sweep.runs_dir.name, *parts[:-1]]))
                if not values.get("mlflow_tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
                    values["mlflow_tracking_uri"] = (sweep.runs_dir.resolve().parent / "mlruns").as_uri()
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
    # Fields only one side knows (added to TrainConfig since, or by a newer mdpo) are not a conflict.
    diffs = sorted(k for k in set(saved) & set(wanted) if k not in PLACEMENT_FIELDS and saved[k] != wanted[k])
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
