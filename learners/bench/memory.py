"""Resident memory and CPU time of a run's processes by kind (driver, learner, actor, Ray's own).

A local run is the driver plus its descendants (Ray's raylet and GCS, and the worker processes the raylet starts),
so sampling the driver's process tree covers it. Per process we keep the peak RSS; for the machine we keep the
peak of the summed PSS (proportional set size: a page shared by n processes counts 1/n in each), because RSS
counts shared pages (libtorch, the object store's shared memory) once per process and its sum overstates the total.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import psutil

# Evaluation runs inside rollout actors (actors/rollout.py), so it has no process kind of its own.
KINDS = ("driver", "learner", "actor", "ray")
_TITLES = {"ray::LearnerWorker": "learner", "ray::RolloutWorker": "actor"}


def process_kind(proc: psutil.Process, driver_pid: int) -> str:
    """Ray names a worker process after the actor class it hosts (`ray::RolloutWorker.collect`); everything else
    under the driver (raylet, gcs_server, dashboard agents, idle workers) is Ray's own."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        title = " ".join(proc.cmdline()[:1]) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "ray"
    for prefix, kind in _TITLES.items():
        if title.startswith(prefix):
            return kind
    return "ray"


def cpu_seconds_by_kind(driver_pid: int | None = None) -> dict[str, float]:
    """CPU time (user + system) consumed so far by the driver's process tree, per kind. The difference of two
    snapshots is what a stretch of training cost, whatever else the machine was doing meanwhile."""
    driver_pid = driver_pid or os.getpid()
    out = dict.fromkeys(KINDS, 0.0)
    try:
        root = psutil.Process(driver_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            if proc.pid == os.getpid():
                # This process's own clock, to the nanosecond: /proc counts in 10 ms ticks, coarser than what the
                # driver spends in a tiny run's window, from which the sampler thread's exact CPU time is taken off.
                out[process_kind(proc, driver_pid)] += time.process_time()
                continue
            times = proc.cpu_times()
            out[process_kind(proc, driver_pid)] += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def own_peak_rss_bytes() -> int:
    """This process's peak resident set size (getrusage; kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemorySampler:
    """Samples the driver's process tree; `phase(name)` scopes what is recorded.

    RSS (cheap: /proc/PID/statm) every `interval_s`; PSS (smaps_rollup, ~10 ms per big process) only when the
    total RSS is within 3% of the phase's highest so far, at most every `pss_interval_s` (and at least every
    `pss_max_gap_s`): the peak of the total is caught without the sampler eating a good part of a core. The process
    tree itself (a walk over every process of the machine) is re-read every `tree_interval_s` and at phase edges.
    `cpu_seconds` is the sampler's own CPU time, to be told apart from the driver's: it competes with the run.
    """

    def __init__(self, interval_s: float = 0.25, pss_interval_s: float = 2.0, pss_max_gap_s: float = 5.0,
                 tree_interval_s: float = 2.0, driver_pid: int | None = None):
        self.interval_s, self.pss_interval_s, self.pss_max_gap_s = interval_s, pss_interval_s, pss_max_gap_s
        self.tree_interval_s = tree_interval_s
        self._tree: list[psutil.Process] = []
        self._tree_time = -math.inf
        self.driver_pid = driver_pid or os.getpid()
        self.cpu_seconds = 0.0
        self._phase: str | None = None
        self._peak_rss: dict[str, dict[int, tuple[str, int]]] = defaultdict(dict)   # phase -> pid -> (kind, bytes)
        self._peak_pss: dict[str, dict[int, int]] = defaultdict(dict)
        self._total_pss: dict[str, int] = defaultdict(int)                          # phase -> peak of the sum
        self._total_rss: dict[str, int] = defaultdict(int)
        self._samples: dict[str, int] = defaultdict(int)
        self._last_pss = 0.0
        self._kinds: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    @contextmanager
    def phase(self, name: str):
        with self._lock:
            previous, self._phase = self._phase, name
        self.sample_once(pss=True)
        try:
            yield
        finally:
            self.sample_once(pss=True)     # so even a phase shorter than the interval has a full sample
            with self._lock:
                self._phase = previous

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def sample_once(self, pss: bool | None = None) -> None:
        t_cpu = time.thread_time()
        with self._lock:
            phase = self._phase
        if phase is None:
            return
        procs = self._processes(refresh=pss is True)
        if not procs:
            return
        seen = []
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kind = self._kinds.get(proc.pid)
            if kind in (None, "ray"):       # a worker's title names its actor only once the actor is placed
                kind = self._kinds[proc.pid] = process_kind(proc, self.driver_pid)
            seen.append((proc, kind, rss))
        total_rss = sum(rss for _, _, rss in seen)
        now = time.monotonic()
        if pss is None:
            since = now - self._last_pss
            pss = since >= self.pss_max_gap_s or (since >= self.pss_interval_s
                                                   and total_rss >= 0.97 * self._total_rss[phase])
        pss_of: dict[int, int] = {}
        if pss:
            self._last_pss = now
            for proc, _, rss in seen:
                try:
                    pss_of[proc.pid] = getattr(proc.memory_full_info(), "pss", rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        with self._lock:
            rss_peaks, pss_peaks = self._peak_rss[phase], self._peak_pss[phase]
            for proc, kind, rss in seen:
                rss_peaks[proc.pid] = (kind, max(rss, rss_peaks.get(proc.pid, (kind, 0))[1]))
                if proc.pid in pss_of:
                    pss_peaks[proc.pid] = max(pss_of[proc.pid], pss_peaks.get(proc.pid, 0))
            self._total_rss[phase] = max(self._total_rss[phase], total_rss)
            if pss_of:
                self._total_pss[phase] = max(self._total_pss[phase], sum(pss_of.values()))
            self._samples[phase] += 1
            self.cpu_seconds += time.thread_time() - t_cpu

    def _processes(self, refresh: bool) -> list[psutil.Process]:
        now = time.monotonic()
        if refresh or now - self._tree_time >= self.tree_interval_s:
            try:
                root = psutil.Process(self.driver_pid)
                self._tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._tree = []
            self._tree_time = now
        return self._tree

    def summary(self, *phases: str) -> dict:
        """Peaks over the given phases: per kind the largest single process (RSS and PSS), the number of
        processes, and the peak total PSS of all processes at one instant."""
        with self._lock:
            kinds: dict[str, dict] = {k: {"processes": 0, "peak_rss_bytes": 0, "peak_pss_bytes": 0} for k in KINDS}
            pids: dict[str, set] = defaultdict(set)
            for phase in phases:
                for pid, (kind, rss) in self._peak_rss[phase].items():
                    entry = kinds[kind]
                    entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], rss)
                    entry["peak_pss_bytes"] = max(entry["peak_pss_bytes"], self._peak_pss[phase].get(pid, 0))
                    pids[kind].add(pid)
            for kind, entry in kinds.items():
                entry["processes"] = len(pids[kind])
            return {"total_pss_peak_bytes": max((self._total_pss[p] for p in phases), default=0),
                    "total_rss_peak_bytes": max((self._total_rss[p] for p in phases), default=0),
                    "samples": sum(self._samples[p] for p in phases),
                    "kinds": {k: v for k, v in kinds.items() if v["processes"]}}
