"""`mdpo bench`'s output: the table of a result, and the command itself (measure, or reprint a saved result)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from learners.bench.measure import run_bench


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


class Table:
    """Rows of a measurement, its value and unit, aligned."""

    def __init__(self, header: list[str]):
        self.lines = header + [f"{'measurement':52s} {'value':>14s}  unit", "-" * 80]

    def row(self, name: str, value: float, unit: str, fmt: str = "{:,.0f}") -> None:
        self.lines.append(f"{name:52s} {fmt.format(value):>14s}  {unit}")


def format_table(r: dict) -> str:
    c, m = r["config"], r["machine"]
    t = Table([f"mdpo bench --size {r['size']}: {r['env_id']}, {c['num_learners']} learners x {c['num_actors']} actor x "
             f"{c['num_envs']} envs x {c['num_steps']} steps, {c['num_minibatches']} minibatches x "
             f"{c['update_epochs']} epochs, sync {c['sync']}, {c['distill_mode']}",
             f"machine: {m['cores']} cores, load average {m['load_average_before'][0]:.2f} before / "
             f"{m['load_average_after'][0]:.2f} after; torch {m['torch']}, ray {m['ray']}; "
             f"{r['wall_seconds']:.0f} s", ""])
    for section in (_stage_rows, _end_to_end_rows, _sync_rows, _wire_rows, _cost_rows, _memory_rows):
        section(t.row, r)
    if "device_costs" in r:
        t.lines.append("")
        t.lines.append(_device_cost_lines(r))
    return "\n".join(t.lines)


def _device_cost_lines(r: dict) -> str:
    from learners.bench.device_costs import Cost, format_costs

    lines = ["per-sample costs (learners/bench/device_costs.py; update = PPO, per sample and epoch):",
             format_costs([Cost(**c) for c in r["device_costs"]["rows"]]),
             "sizing: rollout actor cores that keep one learner busy (its env steps/s / one actor core's)"]
    for z in r["device_costs"]["sizing"]:
        lines.append(f"  {z['device']} {z['precision']}: learner trains on {z['learner_env_steps_per_second']:,.0f} "
                     f"env steps/s; {z['actor_cores_local_inference']:.1f} cores with local inference, "
                     f"{z['actor_cores_served_inference']:.1f} with learner-served inference (at the env-only rate)")
    return "\n".join(lines)


def _stage_rows(row, r: dict) -> None:
    c, s, b, m = r["config"], r["stages"], r["bounds"], r["machine"]
    row("env bound: 1 actor's vector env, random actions", s["env"]["env_steps_per_second"], "env steps/s")
    row("actor bound: 1 rollout actor incl. CPU inference", s["actor"]["env_steps_per_second"], "env steps/s")
    row("  share of the actor's time in inference", s["actor"]["inference_fraction"], "", "{:.2f}")
    if "actor_served" in s:
        row("actor with learner-served inference (1 learner on its own CPUs)", s["actor_served"]["env_steps_per_second"],
            "env steps/s")
        row("  served / local inference", s["actor_served"]["ratio_to_local"], "", "{:.2f}")
    row(f"learner bound: PPO + distillation ({c['distill_mode']}), per learner", s["learner"]["samples_per_second"],
        "samples/s")
    row(f"  bound of the actors ({min(c['num_learners'] * c['num_actors'], m['cores'])} at once)", b["actors"],
        "env steps/s")
    row(f"  bound of the learners ({c['num_learners']} x rate / {c['update_epochs']} epochs)", b["learners"],
        "env steps/s")
    row("  stages sharing the cores (1 / sum of 1/bound)", b["shared_core_bound"], "env steps/s")


def _end_to_end_rows(row, r: dict) -> None:
    b = r["bounds"]
    for name, e in r["end_to_end"].items():
        row(f"end to end, {name.replace('_', ' ')}", e["env_steps_per_second"], "env steps/s")
        row(f"  pipeline efficiency (vs {b['slowest_stage']} bound)", e["efficiency"], "", "{:.2f}")
        row("  efficiency vs the shared-core bound", e["efficiency_vs_shared_cores"], "", "{:.2f}")
        row("  sync fraction of learner time in training", e["sync_fraction"], "", "{:.3f}")
        if "sync_first_step_fraction" in e:      # not in results saved before it was measured
            row("    of which in the first step (the peer starts later)", e["sync_first_step_fraction"], "", "{:.3f}")
        cpu = e["cpu_seconds_per_1000_steps"]
        row("  CPU seconds per 1000 env steps (all processes)", sum(cpu.values()), "s: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])), "{:.1f}")
        row("  CPU utilization of the machine's cores", e["cpu_utilization"], "", "{:.2f}")
        if "tensorboard_seconds_per_iteration" in e:
            row("  TensorBoard writing in the driver, per iteration", 1000 * e["tensorboard_seconds_per_iteration"],
                f"ms ({100 * e['tensorboard_fraction']:.2f}% of the run's wall time)", "{:.1f}")


def _sync_rows(row, r: dict) -> None:
    for sync, x in r["sync"].items():
        row(f"sync {sync}: latency p50 / p99", x["latency_p50_seconds"] * 1e3, f"ms / {x['latency_p99_seconds'] * 1e3:,.0f} ms")
        row(f"  bytes per sync, {x['syncs_per_iteration']:.0f} syncs per iteration", x["bytes_per_sync"] / 2**10, "KiB",
            "{:,.1f}")
        row("  fraction of learner time blocked in syncs", x["sync_fraction"], f"(exchanges overlap "
            f"{x['exchange_fraction']:.2f} of it)", "{:.3f}")


def _wire_rows(row, r: dict) -> None:
    if "wire" not in r:           # results saved before only logits crossed the wire
        return
    w, v2, v1 = r["wire"], r["wire"]["v2_rows_and_logits"], r["wire"]["v1_frames"]
    row(f"wire: one minibatch sync ({w['rows']} rows{', exact' if w['exact'] else ''}), rows + logits",
        v2["seconds"] * 1e3, f"ms, {v2['bytes'] / 2**10:,.1f} KiB (loopback gRPC, median of {w['reps']})", "{:,.1f}")
    row("  the same sync sending the frames (protocol v1)", v1["seconds"] * 1e3,
        f"ms, {v1['bytes'] / 2**20:,.2f} MiB; v2 / v1 {w['ratio']:.3f}", "{:,.1f}")
    row(f"  per iteration ({w['syncs_per_iteration']} syncs): v2 / v1", w["v2_seconds_per_iteration"] * 1e3,
        f"ms / {w['v1_seconds_per_iteration'] * 1e3:,.0f} ms", "{:,.1f}")
    row("  peers' frames each learner holds (moved by Ray once an iteration)", w["peer_frames_held_bytes"] / 2**20,
        "MiB", "{:,.1f}")


def _cost_rows(row, r: dict) -> None:
    d = r["detached_cost"]
    if "rounds" in d:
        each = ", ".join(f"{x['ratio']:.2f}" for x in d["rounds"])
        row("detached cost: update / (PPO update + forward), median", d["ratio"],
            f"of {len(d['rounds'])} rounds: {each}", "{:.2f}")
        row("  best of each (from different moments)", d["best_ratio"], f"({d['update_seconds']:.2f} s vs "
            f"{d['ppo_only_seconds']:.2f} s + {d['forward_seconds']:.2f} s)", "{:.2f}")
    else:                      # results saved before the rounds were kept: the best of each was the ratio
        row("detached cost: update / (PPO update + forward)", d["ratio"], f"({d['update_seconds']:.2f} s vs "
            f"{d['ppo_only_seconds']:.2f} s + {d['forward_seconds']:.2f} s)", "{:.2f}")
    if r.get("exact_cost"):       # results saved before exact mode was measured have none
        e = r["exact_cost"]
        each = ", ".join(f"{x['ratio']:.2f}" for x in e["rounds"])
        row("exact cost: exact / detached update (sync minibatch), median", e["ratio"],
            f"of {len(e['rounds'])} rounds: {each}; target <= {e['target']:.2f}", "{:.2f}")
        row("  best of each", e["exact_seconds"] / e["detached_seconds"], f"({e['exact_seconds']:.2f} s vs "
            f"{e['detached_seconds']:.2f} s); exact blocked in syncs {e['sync_fraction']:.2f} of its time", "{:.2f}")
    for x in r["scaling"]:
        row(f"actor scaling: {x['actors_per_learner']} actor(s) per learner", x["env_steps_per_second"], "env steps/s")


def _memory_rows(row, r: dict) -> None:
    mem = r["memory"]["training"]
    for kind, x in mem["kinds"].items():
        row(f"peak memory: one {kind} process", x["peak_rss_bytes"] / 2**20, f"MiB RSS, {_mb(x['peak_pss_bytes'])} PSS")
    for name, e in r["end_to_end"].items():
        row(f"peak memory: all training processes, {name.replace('_', ' ')}", e["memory_total_pss_peak_bytes"] / 2**20,
            "MiB (sum of PSS)")
    if "evaluation_added_bytes" in r["memory"]:
        ev = r["stages"]["evaluator"]
        row("  evaluation in a rollout actor: added peak memory", ev["added_pss_bytes"] / 2**20,
            f"MiB PSS ({_mb(ev['actor_peak_pss_bytes'])} -> {_mb(ev['evaluating_peak_pss_bytes'])})")
        row(f"  a run of the preset (lag off + evaluation in {r['memory']['evaluators']} actors)",
            r["memory"]["run_total_bytes"] / 2**20, "MiB")
    else:   # results saved when evaluators were processes of their own
        row(f"  a run of the preset (lag off + {r['memory']['evaluators']} evaluators)",
            r["memory"]["run_total_bytes"] / 2**20, "MiB")
    if "probe_cost" in r:     # results saved before the live mechanism metrics have none
        p = r["probe_cost"]
        row(f"probe set ({p['states']} states): building it, once a run", p["build_seconds"], "s", "{:.2f}")
        row("  measuring it: forward passes of one agent, one evaluation", p["seconds_per_agent"], "s", "{:.2f}")
        row(f"  a run of the preset ({p['run_wall_seconds']:.0f} s, {p['evaluations']} evaluations), every one "
            "measuring", 100 * p["every_evaluation_fraction"], "% of its wall time", "{:.1f}")
        row(f"  the same within --probe-budget {p['budget']:g} ({p['rounds_within_budget']} measured)",
            100 * p["budgeted_fraction"], "% of its wall time", "{:.1f}")
        row("  added peak memory of the evaluating actor", p["added_pss_bytes"] / 2**20, "MiB PSS", "{:,.1f}")


def main(args) -> int:
    if args.from_json:
        try:
            result = json.loads(Path(args.from_json).read_text())
            table = format_table(result)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            print(f"mdpo bench: error: --from {args.from_json} is not a result of `mdpo bench --json` "
                  f"({type(err).__name__}: {err})", file=sys.stderr)
            return 2
    else:
        result = run_bench(args.size, env_id=args.env, iterations=args.iterations, max_actors=args.max_actors,
                           scaling=not args.no_scaling, work_dir=args.work_dir,
                           log=(lambda *_: None) if args.json == "-" else print)
        table = format_table(result)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
    else:
        print(table)
        if args.json and not args.from_json:
            Path(args.json).write_text(text + "\n")
    if args.plot:
        from learners.bench.plots import plot_bench

        plot_bench(result, Path(args.plot))
        if args.json != "-":
            print(f"plot: {args.plot}")
    return 0
