"""`mdpo` command line. Exit codes: 0 done, 1 failed, 2 bad usage/config, 130/143 stopped by SIGINT/SIGTERM
(a final checkpoint was written; continue with `mdpo train --resume RUN_DIR`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from learners.config import PRESETS, RESUME_MAY_CHANGE, ConfigError, TrainConfig, field_parser, parse_bool, preset
from learners.training import default_run_dir

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
    try:
        return parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, but none for flags whose default is None: the config flags say their
    TrainConfig default themselves and default to None only so that the CLI can tell which were given."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpo", description="Distributed Mutual Distillation Policy Optimization")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a pair of policies with mutual distillation",
                           formatter_class=DefaultsFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="start from a named configuration (paper: the authors' experiment, README \"Fidelity\"; smoke: 3-minute Procgen check; "
                            "cartpole: fast learning check)")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its latest good checkpoint to the requested total")
    train.add_argument("--log-level", default="INFO")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (preset, overrides, --resume's saved config) as JSON and exit "
                            "without starting anything")
    _add_config_flags(train)
    _add_study_commands(sub)
    _add_bench_command(sub)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (dest: the field name; None when not given).

    argparse rather than tyro (cleanrl's): tyro 1.0.17 takes a bool field as `--flag`/`--no-flag` or, with
    FlagConversionOff, as `--flag True` only, never both and never `--flag true`, which `mdpo sweep` writes and users'
    scripts have; and it returns a filled dataclass, which cannot tell a flag given with its default's value from
    one not given (what --resume and presets need)."""
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        names = FLAG_ALIASES.get(f.name, []) + [flag]
        text = f"{helps.get(f.name, '')} (default {f.default!r})"
        if str(f.type) == "bool":   # `--flag` / `--no-flag`, and `--flag true|false` as the sweep writes them
            parser.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                                help=text)
            parser.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_const", const=False,
                                help=f"the same as {flag} false")
            continue
        parser.add_argument(*names, dest=f.name, type=field_parser(f.name), default=None,
                            metavar=f.name.split("_")[-1].upper(), help=text)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's validated config and directory (the checks that need the machine are `preflight`'s)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"--resume {run_dir}: no config.json there; pass the run directory of an earlier run")
        if args.preset:
            raise ConfigError("--resume continues a run with its saved config; drop --preset")
        if set(overrides) - RESUME_MAY_CHANGE:
            raise ConfigError(f"--resume can only change {sorted(RESUME_MAY_CHANGE)}; "
                              f"got {sorted(set(overrides) - RESUME_MAY_CHANGE)}")
        cfg = dataclasses.replace(TrainConfig.load(run_dir / "config.json"), **overrides)
    else:
        cfg = dataclasses.replace(preset(args.preset) if args.preset else TrainConfig(), **overrides)
        run_dir = default_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    cfg.validate()
    return cfg, run_dir


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
    from learners.coordinator.failures import RunStopped, TrainingDiverged
    from learners.training import make_coordinator, prepare

    try:
        cfg, run_dir = resolve_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        found = prepare(cfg, run_dir, resume=bool(args.resume))
        if found == "finished":
            print(f"{run_dir} holds this run, finished ({cfg.num_iterations} iterations): nothing to do")
            return 0
    except ConfigError as err:
        print(f"mdpo train: error: {err}", file=sys.stderr)
        return 2
    coordinator = make_coordinator(cfg, run_dir, resume=found == "resume")
    log.info("run directory: %s", run_dir.resolve())
    bar = None
    try:
        coordinator.start()
        print(coordinator.telemetry.describe_endpoints(), flush=True)   # the Prometheus endpoints it serves
        bar, update = _progress_bar(cfg, coordinator.env_steps[0])
        summary = coordinator.run(update)
    except RunStopped as stop:
        log.warning("%s; resume with: mdpo train --resume %s", stop, run_dir)
        return 128 + (coordinator.stop_signal or signal.SIGINT)
    except ConfigError as err:      # found only once Ray is up: unreachable cluster, nothing to resume...
        print(f"mdpo train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"mdpo train: error: training diverged: {err}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("training failed; the latest checkpoint in %s/checkpoints is intact "
                      "(continue with: mdpo train --resume %s)", run_dir, run_dir)
        return 1
    finally:
        if bar is not None:
            bar.close()
        coordinator.shutdown()
    learners = ", ".join(f"agent {l['id']}: train {l['final_train_return']} test {l['final_test_return']}"
                         for l in summary["learners"])
    print(f"done: {summary['iterations']} iterations, {summary['env_steps']['per_agent'][0]} env steps per agent "
          f"in {summary['wall_seconds']:.1f}s; {learners}\nrun directory: {run_dir}")
    return 0


# ------------------------------------------------------------------ the study: sweep, analyze, report
def _add_study_commands(sub) -> None:
    from learners.study.sweep import MANAGED

    sweep = sub.add_parser("sweep", formatter_class=DefaultsFormatter,
                           help="train a grid of runs (games x methods x axes x seeds) on the Ray cluster",
                           description="Runs RUNS_DIR/<game>/<method>[/<field>=<value>...]/seed<k> as `mdpo train` "
                                       "subprocesses on one Ray cluster, as many at once as its resources allow; "
                                       "skips finished cells and resumes interrupted ones. Put RUNS_DIR first.")
    sweep.add_argument("runs_dir", metavar="RUNS_DIR")
    sweep.add_argument("--games", nargs="+", required=True, help="Procgen games or Gymnasium ids; `all`: the 16 games")
    sweep.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    sweep.add_argument("--methods", nargs="+", default=["mdpo", "ppo"],
                       help="mdpo (the authors' MDPO: alpha 1, exact), dml (alpha 1, peer detached), ppo (the authors' "
                            "PPO baseline: alpha 0) or NAME:FIELD=VALUE[,FIELD=VALUE...]")
    sweep.add_argument("--axis", action="append", default=[], metavar="FIELD=V1,V2",
                       help="an extra grid dimension over any TrainConfig field (repeatable)")
    sweep.add_argument("--preset", choices=sorted(PRESETS), default=None, help="every cell starts from this preset")
    sweep.add_argument("--max-concurrent", type=int, default=0, help="cap on cells at once (0: as resources allow)")
    sweep.add_argument("--ray-address", default="", help="cluster to run on (default RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--log-level", default="WARNING")
    sweep.add_argument("--print-config", action="store_true",
                       help="print every cell's resolved config as JSON ({cell: config}) and exit without running")
    group = sweep.add_argument_group("fixed overrides for every cell (any `mdpo train` flag)")
    _add_config_flags(group, skip=MANAGED)

    analyze = sub.add_parser("analyze", formatter_class=DefaultsFormatter,
                             help="robustness to rendering, agent agreement and t-SNE of a run's policies",
                             description="Writes RUN_DIR/analysis/ for every Procgen run at or below each PATH.")
    analyze.add_argument("paths", nargs="+", metavar="RUN_DIR")
    analyze.add_argument("--num-envs", type=int, default=8, help="test-level games played side by side")
    analyze.add_argument("--num-steps", type=int, default=64, help="steps per game (states: num-envs x num-steps)")
    analyze.add_argument("--variants", default="no_backgrounds,monochrome_assets",
                         help="comma-separated rendering variants: no_backgrounds, monochrome_assets, paint_vel_info")
    analyze.add_argument("--seed", type=int, default=0, help="seeds the test levels and the driving actions")
    analyze.add_argument("--driver", choices=["random", "agent"], default="random",
                         help="random: uniform actions, the same states for every run of a game; agent: agent 0 acts")
    analyze.add_argument("--tsne-points", type=int, default=200, help="states per t-SNE panel (0: no t-SNE)")
    analyze.add_argument("--log-level", default="WARNING")

    report = sub.add_parser("report", formatter_class=DefaultsFormatter,
                            help="figures and tables of the study from run directories")
    report.add_argument("runs_dir", metavar="RUNS_DIR")
    report.add_argument("--out", default=None, help="output directory (default RUNS_DIR/report)")
    report.add_argument("--include-incomplete", action="store_true")
    report.add_argument("--log-level", default="WARNING")


def cmd_sweep(args: argparse.Namespace) -> int:
    from learners.study.sweep import MANAGED, Method, SweepConfig, expand, parse_axis
    from learners.study.sweep_runner import SweepRunner

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name not in MANAGED and getattr(args, f.name) is not None}
    try:
        axes = dict(parse_axis(spec) for spec in args.axis)
        if len(axes) != len(args.axis):
            raise ConfigError("--axis names a field twice")
        sweep = SweepConfig(Path(args.runs_dir), args.games, args.seeds, [Method.parse(m) for m in args.methods],
                            axes, args.preset, overrides, args.max_concurrent, args.ray_address)
        if args.print_config:
            print(json.dumps({cell.name: cell.config.to_dict() for cell in expand(sweep.validate())}, indent=2))
            return 0
        return SweepRunner(sweep).run()
    except ConfigError as err:
        print(f"mdpo sweep: error: {err}", file=sys.stderr)
        return 2


def cmd_analyze(args: argparse.Namespace) -> int:
    from learners.study.robustness import AnalyzeConfig, analyze_paths

    cfg = AnalyzeConfig(args.num_envs, args.num_steps, tuple(v for v in args.variants.split(",") if v), args.seed,
                        args.driver, args.tsne_points)
    try:
        results, problems = analyze_paths([Path(p) for p in args.paths], cfg)
    except ConfigError as err:
        print(f"mdpo analyze: error: {err}", file=sys.stderr)
        return 2
    if not results:
        print(f"mdpo analyze: error: nothing analysed: {len(problems)} runs skipped (reasons above)", file=sys.stderr)
        return 2
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from learners.study.report import ReportConfig, build_report

    try:
        paths = build_report(ReportConfig(Path(args.runs_dir), Path(args.out) if args.out else None,
                                          args.include_incomplete))
    except ConfigError as err:
        print(f"mdpo report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {paths['markdown']}\n" + "\n".join(f"  {p}" for k, p in paths.items() if k != "markdown"))
    return 0


STUDY_COMMANDS = {"sweep": cmd_sweep, "analyze": cmd_analyze, "report": cmd_report}


# ------------------------------------------------------------------ bench (learners/bench/)
def _add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", formatter_class=DefaultsFormatter,
                           help="measure every stage and the whole pipeline on this machine (README: Performance)")
    bench.add_argument("--size", choices=["tiny", "smoke", "paper"], default="smoke",
                       help="shape: tiny (CI, ~1 min), smoke (the smoke preset), paper (the paper preset's iteration)")
    bench.add_argument("--env", default=None, help="game or Gymnasium id (default: the size's preset, coinrun)")
    bench.add_argument("--iterations", type=int, default=None, help="end-to-end iterations per run (>= 3)")
    bench.add_argument("--max-actors", type=int, default=None, help="actor scaling up to this many per learner "
                                                                     "(default: the core count)")
    bench.add_argument("--no-scaling", action="store_true", help="skip the actor-scaling runs")
    bench.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                       help="print the results as JSON instead of the table, or with PATH write them there too")
    bench.add_argument("--plot", default=None, metavar="PNG", help="also draw the results (throughput vs bounds, "
                       "actor scaling, sync cost, memory) to this PNG")
    bench.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                       help="measure nothing: print the table (and --plot) of a result saved with --json PATH")
    bench.add_argument("--work-dir", default=None, help="where the temporary run directories go")
    bench.add_argument("--log-level", default="WARNING")


def cmd_bench(args: argparse.Namespace) -> int:
    from learners.bench.table import main as bench_main

    if args.iterations is not None and args.iterations < 3:
        print("mdpo bench: error: --iterations must be >= 3 (the first is warm-up; the lag needs one more)",
              file=sys.stderr)
        return 2
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path not in (None, "-") and not Path(path).parent.is_dir():
            print(f"mdpo bench: error: {flag} {path}: directory {Path(path).parent} does not exist; create it or "
                  "pick another path", file=sys.stderr)
            return 2
    if args.from_json and not Path(args.from_json).is_file():
        print(f"mdpo bench: error: --from {args.from_json}: no such file; give a result written by "
              "`mdpo bench --json PATH`", file=sys.stderr)
        return 2
    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        return cmd_train(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command in STUDY_COMMANDS:
        return STUDY_COMMANDS[args.command](args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
