"""Running a sweep's cells on one Ray cluster: `mdpo train` subprocesses, as many at once as resources allow.

The cluster is the one given by --ray-address (or RAY_ADDRESS), else a local Ray the sweep starts; each cell
attaches to it with --ray-address. Cells run at once while their reservations (CPUs, and GPUs and `learner`
slots where the cluster has them, placed as the coordinator places them) fit in the cluster's totals, so
concurrent runs never wait on each other's actors. Progress is one plain line per event; RUNS_DIR/sweep-status.json
holds every cell's state. SIGINT/SIGTERM stop the running cells with one SIGTERM each (they checkpoint); a
second signal kills them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from learners.config import TrainConfig
from learners.coordinator.cluster import check_reachable, init_local_ray, run_cpus
from learners.files import atomic_write
from learners.study.runs import CELL_FILE
from learners.study.sweep import Cell, SweepConfig, cell_status, expand, train_command
from learners.tracking import prepare_sweep

STATUS_FILE = "sweep-status.json"
LOG_FILE = "train.log"
_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")   # Ray's forwarded worker output


def cell_resources(cfg: TrainConfig, cluster: dict[str, float]) -> dict[str, float]:
    """What a run reserves on the cluster, placed as the coordinator places it (evaluators run inside rollout actors)."""
    need = {"CPU": run_cpus(cfg)}
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
        atomic_write(self.sweep.runs_dir / STATUS_FILE, json.dumps(data, indent=1) + "\n")

    # --------------------------------------------------------------- the sweep
    def run(self) -> int:
        """Run every cell that is not done; 0 if all are done, 1 if any failed, 128+signal if stopped."""
        cells = expand(self.sweep)
        prepare_sweep([(cell.config, cell.run_dir) for cell in cells])
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
            check_reachable(address)          # a clear ConfigError instead of Ray's long retry loop
            ray.init(address=address, log_to_driver=False)
            return address, ray.cluster_resources()
        # Like `mdpo train` alone, a local cluster is sized so that any single cell fits.
        biggest = max(cell_resources(st.cell.config, {})["CPU"] for st in pending)
        # As `mdpo train`'s embedded Ray: its workers (the cells' learners and actors) inherit WORKER_ENV.
        init_local_ray(max(os.cpu_count() or 1, math.ceil(biggest)), log_to_driver=False)
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
        status, reason = cell_status(st.cell)
        if status == "conflict":             # e.g. TrainConfig changed under a running sweep
            st.status, st.reason = "failed", reason
        elif st.exit_code == 0 and status == "done":
            st.status, st.reason = "done", f"finished in {st.ended - st.started:.0f}s"
        elif self.stop_signal is not None:     # we stopped it (before its first checkpoint, it restarts)
            st.status, st.reason = "interrupted", f"stopped by the sweep (exit {st.exit_code}); rerun the sweep to resume"
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
                # The run's own lines: Ray's forwarded worker output ("(LearnerWorker pid=...) ...") is left out.
                lines = [line for line in log.read_text(errors="replace").splitlines() if not _WORKER_LINE.match(line)]
                self.say("\n".join(f"    {line}" for line in lines[-12:]))
                self.say(f"    (full log: {log})")
