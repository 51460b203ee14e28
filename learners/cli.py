"""`mdpo` command line. Exit codes: 0 done, 1 failed, 2 bad usage/config, 130/143 stopped by SIGINT/SIGTERM
(a final checkpoint was written; continue with `mdpo train --resume RUN_DIR`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path

from learners.config import PRESETS, ConfigError, TrainConfig, preset

log = logging.getLogger("mdpo")

# Flags every user reaches for; every other TrainConfig field is also a flag (see `mdpo train --help`).
FLAG_ALIASES = {"env_id": ["--env"]}


def _field_help(cls) -> dict[str, str]:
    """Field docstrings of the dataclass (the string literal after each field), used as --help text."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo", description="Distributed Mutual Distillation Policy Optimization")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a pair of policies with mutual distillation",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="start from a named configuration (paper: PAPER.md; smoke: 3-minute Procgen check; "
                            "cartpole: fast learning check)")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its latest good checkpoint to the requested total")
    train.add_argument("--log-level", default="INFO")
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        names = FLAG_ALIASES.get(f.name, []) + [f"--{f.name.replace('_', '-')}"]
        kind = _bool if f.type in ("bool", bool) else {"int": int, "float": float}.get(str(f.type), str)
        train.add_argument(*names, dest=f.name, type=kind, default=None, metavar=f.name.split("_")[-1].upper(),
                           help=f"{helps.get(f.name, '')} (default {f.default!r})")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"--resume {run_dir}: no config.json there; pass the run directory of an earlier run")
        if args.preset:
            raise ConfigError("--resume continues a run with its saved config; drop --preset")
        allowed = {"total_steps", "ray_address", "progress", "checkpoint_every", "device"}
        if set(overrides) - allowed:
            raise ConfigError(f"--resume can only change {sorted(allowed)}; got {sorted(set(overrides) - allowed)}")
        cfg = dataclasses.replace(TrainConfig.load(run_dir / "config.json"), **overrides)
    else:
        cfg = dataclasses.replace(preset(args.preset) if args.preset else TrainConfig(), **overrides)
        run_dir = Path(cfg.run_dir or f"runs/{cfg.env_id.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.run_dir = str(run_dir)
    return cfg.validate(), run_dir


def _progress_bar(cfg: TrainConfig, start_steps: int):
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_iterations * cfg.batch_size, initial=start_steps, unit="step", disable=not cfg.progress,
               dynamic_ncols=True, desc="env steps/agent")

    def update(record: dict) -> None:
        bar.update(record["env_steps"] - bar.n)
        rets = " ".join(f"{l['train_return']:.1f}" if l["train_return"] is not None else "-" for l in record["learners"])
        tests = " ".join(f"{l['test_return']:.1f}" if l["test_return"] is not None else "-" for l in record["learners"])
        bar.set_postfix_str(f"it {record['iteration']}/{cfg.num_iterations} "
                            f"{record['env_steps_per_second']:.0f} steps/s train [{rets}] test [{tests}]")

    return bar, update


def cmd_train(args: argparse.Namespace) -> int:
    from learners.coordinator import Coordinator, RunStopped

    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as err:
        print(f"mdpo train: error: {err}", file=sys.stderr)
        return 2
    coordinator = Coordinator(cfg, run_dir, resume=bool(args.resume))
    log.info("run directory: %s", run_dir.resolve())
    bar = None
    try:
        coordinator.start()
        bar, update = _progress_bar(cfg, coordinator.env_steps[0])
        summary = coordinator.run(update)
    except RunStopped as stop:
        log.warning("%s; resume with: mdpo train --resume %s", stop, run_dir)
        return 128 + (coordinator.stop_signal or signal.SIGINT)
    finally:
        if bar is not None:
            bar.close()
        coordinator.shutdown()
    learners = ", ".join(f"agent {l['id']}: train {l['final_train_return']} test {l['final_test_return']}"
                         for l in summary["learners"])
    print(f"done: {summary['iterations']} iterations, {summary['env_steps']['per_agent'][0]} env steps per agent "
          f"in {summary['wall_seconds']:.1f}s; {learners}\nrun directory: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        return cmd_train(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
