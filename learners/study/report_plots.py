"""Figures of the study report: return curves, probe curves, grouped bars, t-SNE panels. Every figure is written as
PNG and SVG except t-SNE scatter plots (PNG only: thousands of points make heavy SVG)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, stem: Path, formats=("png", "svg")) -> dict[str, Path]:
    paths = {}
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path)
        paths[f"{stem.name}_{fmt}"] = path
    plt.close(fig)
    return paths


def _method_colors(methods) -> dict[str, str]:
    return {m: f"C{i}" for i, m in enumerate(sorted(methods))}


def _band(ax, points: list[tuple], color: str, label: str) -> None:
    """points: (env steps, mean, std or None); the mean as a line, ± std as a band (no band where std is None)."""
    points = sorted(points)
    steps = np.array([p[0] for p in points], float)
    mean = np.array([p[1] for p in points], float)
    std = np.array([np.nan if p[2] is None else p[2] for p in points], float)
    ax.plot(steps, mean, color=color, label=label, marker="o" if len(steps) < 12 else None, markersize=3)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def plot_curves(rows: list[dict], stem: Path) -> dict[str, Path]:
    """Per game, a train panel and a test panel; one line (mean) and band (± std) per method."""
    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        series[(r["game"], r["split"], r["method"])].append((r["env_steps"], r["mean"], r["std"]))
    games = sorted({r["game"] for r in rows})
    colors = _method_colors({r["method"] for r in rows})
    per_row = min(2, max(1, len(games)))
    nrows = math.ceil(len(games) / per_row)
    fig, axes = plt.subplots(nrows, 2 * per_row, figsize=(4.2 * 2 * per_row, 3.0 * nrows), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for g, game in enumerate(games):
        for s, split in enumerate(("train", "test")):
            ax = axes[g // per_row][2 * (g % per_row) + s]
            ax.set_visible(True)
            _curve_panel(ax, {m: series.get((game, split, m), []) for m in colors}, colors, f"{game}: {split} levels",
                         "episode return", "no episode finished yet", title_size=10)
    fig.tight_layout()
    return _save(fig, stem)


def _curve_panel(ax, by_method: dict[str, list], colors: dict, title: str, ylabel: str, empty: str,
                 title_size: int = 9) -> None:
    """One panel of curves over env steps: a line (mean over seeds) and band (± std) per method that has points."""
    for method in sorted(by_method):
        if by_method[method]:
            _band(ax, by_method[method], colors[method], method)
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel("env steps per agent", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def _probe_panels(variants: list[str]) -> list[list[tuple[str, str, str]]]:
    """The probe figure's grid of (metric, variant, title): the top row compares action distributions (TV), the
    bottom row encoder features (CKA); one column per rendering variant (across renderings: variants differ in
    how much they change the frame, so averaging them would hide which change the agents ignore), the last column
    between agents."""
    tv = [("robustness_tv", v, f"robustness TV: {v}") for v in variants]
    cka = [("render_cka", v, f"render CKA: {v}") for v in variants]
    return [tv + [("agreement_tv", "", "agreement TV (between agents)")],
            cka + [("cka", "", "CKA between agents")]]


def plot_probe(rows: list[dict], game: str, stem: Path) -> dict[str, Path]:
    """One game's probe curves (report.py's probe_rows): one line (mean over seeds) and band (± std) per method per
    panel; a method without that metric (old runs; pair metrics of one-learner runs) has no line there."""
    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        series[(r["metric"], r["variant"], r["method"])].append((r["env_steps"], r["mean"], r["std"]))
    variants = sorted({r["variant"] for r in rows if r["metric"] in ("robustness_tv", "render_cka")})
    colors = _method_colors({r["method"] for r in rows})
    grid = _probe_panels(variants)
    fig, axes = plt.subplots(2, len(grid[0]), figsize=(3.6 * len(grid[0]), 5.6), dpi=90, squeeze=False)
    for panel_row, ax_row in zip(grid, axes):
        for (metric, variant, title), ax in zip(panel_row, ax_row):
            _curve_panel(ax, {m: series.get((metric, variant, m), []) for m in colors}, colors, title,
                         "total-variation distance" if metric.endswith("tv") else "linear CKA", "no probe records")
    fig.suptitle(f"{game}: the mechanism on the probe states (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def plot_bars(rows: list[dict], keys: str | list[str], ylabel: str, title: str, stem: Path) -> dict[str, Path]:
    """Grouped bars: games on the x axis, one bar (mean, ± std error bar) per method; one panel per key."""
    keys = [keys] if isinstance(keys, str) else keys
    games = sorted({r["game"] for r in rows})
    colors = _method_colors({r["method"] for r in rows})
    width = 0.8 / max(1, len(colors))
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.0, 1.1 * len(games) + 2) * len(keys), 3.4), dpi=90,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        for m, method in enumerate(sorted(colors)):
            by_game = {r["game"]: r for r in rows if r["method"] == method}
            mean = [by_game[g][f"{key}_mean"] if g in by_game and by_game[g][f"{key}_mean"] is not None else np.nan
                    for g in games]
            err = [by_game[g][f"{key}_std"] if g in by_game and by_game[g][f"{key}_std"] is not None else 0.0
                   for g in games]
            ax.bar(np.arange(len(games)) + (m - (len(colors) - 1) / 2) * width, mean, width, yerr=err, capsize=3,
                   color=colors[method], label=method)
        ax.set_xticks(np.arange(len(games)), games, rotation=30 if len(games) > 4 else 0, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title if len(keys) == 1 else key.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    if len(keys) > 1:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, stem)


def plot_tsne(panels: list[tuple], path: Path, title: str) -> Path:
    """panels: (title, coords (n, 2), rendering index per point, rendering names); points coloured by rendering."""
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, coords, rendering, names) in zip(axes.flat, panels):
        ax.set_visible(True)
        for k, render in enumerate(names):
            mask = np.asarray(rendering) == k
            ax.scatter(coords[mask, 0], coords[mask, 1], s=5, alpha=0.7, color=f"C{k + 2}", label=render)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
