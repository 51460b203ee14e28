"""One PNG of an `mdpo bench` result: throughput against the stage bounds, actor scaling, sync cost per schedule,
and peak memory against the issue's targets (the dashed lines)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYNC_TARGET = 0.03          # sync time <= 3% of learner wall time, default schedule
MEMORY_TARGET = 4 * 2**30   # a paper-preset run on one machine <= 4 GiB


def _throughput(ax, r: dict) -> None:
    b, e2e = r["bounds"], r["end_to_end"]
    rows = [("env bound", b["env"], "C7"), ("actors bound", b["actors"], "C7"), ("learners bound", b["learners"], "C7"),
            ("shared-core bound", b["shared_core_bound"], "C8")]
    rows += [(f"end to end, {name.replace('_', ' ')}", e["env_steps_per_second"], "C0") for name, e in e2e.items()]
    labels, values, colors = zip(*rows)
    y = range(len(rows))[::-1]
    ax.barh(list(y), values, color=colors)
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=8)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,.0f}", va="center", fontsize=7)
    ax.axvline(b["bound"], color="C3", linestyle="--", linewidth=1)
    ax.set_xlim(right=max(values) * 4)
    ax.set_xlabel("env steps/s (all agents; log scale)")
    eff = ", ".join(f"{e['efficiency']:.2f}" for e in e2e.values())
    ax.set_title(f"throughput: efficiency vs slowest stage {eff}", fontsize=9)


def _scaling(ax, r: dict) -> None:
    points = r.get("scaling") or []
    if points:
        ax.plot([p["actors_per_learner"] for p in points], [p["env_steps_per_second"] for p in points], "o-", color="C0",
                label="end to end")
        ax.set_xticks([p["actors_per_learner"] for p in points])
    ax.axhline(r["bounds"]["bound"], color="C3", linestyle="--", linewidth=1, label="slowest-stage bound")
    ax.axhline(r["bounds"]["shared_core_bound"], color="C8", linestyle=":", linewidth=1, label="shared-core bound")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rollout actors per learner")
    ax.set_ylabel("env steps/s")
    ax.set_title("actor scaling" if points else "actor scaling (not measured: --no-scaling)", fontsize=9)
    ax.legend(fontsize=7)


def _sync(ax, r: dict) -> None:
    names = list(r["sync"])
    fractions = [r["sync"][n]["sync_fraction"] for n in names]
    default = r["config"]["sync"]
    ax.bar(names, fractions, color=["C0" if n == default else "C7" for n in names])
    for i, n in enumerate(names):
        s = r["sync"][n]
        ax.text(i, fractions[i], f"p50 {s['latency_p50_seconds'] * 1e3:,.0f} ms\n{s['bytes_per_sync'] / 2**20:.1f} MiB",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(SYNC_TARGET, color="C3", linestyle="--", linewidth=1, label="target (default schedule)")
    training = r["end_to_end"]["policy_lag_off"]["sync_fraction"]
    ax.axhline(training, color="C1", linestyle=":", linewidth=1, label=f"in training, lag off ({default})")
    ax.set_ylim(0, max(fractions + [SYNC_TARGET, training]) * 1.4)
    ax.set_ylabel("fraction of learner time blocked")
    ax.set_title(f"sync cost per schedule (default: {default})", fontsize=9)
    ax.legend(fontsize=7)


def _memory(ax, r: dict) -> None:
    mem = r["memory"]
    kinds = mem["training"]["kinds"]
    labels = [f"one {k}" for k in kinds] + ["all training", "run of the preset"]
    values = [x["peak_pss_bytes"] for x in kinds.values()]
    values += [r["end_to_end"]["policy_lag_off"]["memory_total_pss_peak_bytes"], mem["run_total_bytes"]]
    mib = [v / 2**20 for v in values]
    ax.bar(range(len(labels)), mib, color=["C7"] * len(kinds) + ["C0", "C0"])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    for i, v in enumerate(mib):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(MEMORY_TARGET / 2**20, color="C3", linestyle="--", linewidth=1,
               label="target: a paper-preset run" if r["size"] == "paper" else "paper-preset target (for scale)")
    ax.set_ylabel("peak PSS (MiB)")
    ax.set_title("peak memory", fontsize=9)
    ax.legend(fontsize=7)


def plot_bench(r: dict, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    _throughput(axes[0, 0], r)
    _scaling(axes[0, 1], r)
    _sync(axes[1, 0], r)
    _memory(axes[1, 1], r)
    m = r["machine"]
    fig.suptitle(f"mdpo bench --size {r['size']}: {r['env_id']}, {m['cores']} cores, torch {m['torch']}, "
                 f"ray {m['ray']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
