"""The whole cost of a submission: CPU by process and phase until the exchange is idle again, and a timeline.

Used by ``bench/deadline.py --until-idle`` (see ``bench/README.md``, "The whole
cost of a submission"). A :class:`Watch` thread samples, every second, the CPU
time of each group of processes (each server process, the load generator,
py-spy, our PostgreSQL backends, PostgreSQL's background processes, the
shared Redis, everyone else) and, through a read-only look at the database
(:class:`LogProbe`), how far the log, the archive checks, the projections and
the sweep have come. The phases are cut at marks the benchmark sets: ``GO``,
``UPLOADS_DONE`` (the last accept's answer) and ``IDLE``.
"""

from __future__ import annotations

import math
import os
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import CLOCK_TICKS, machine_busy_seconds, pct

#: The parent's own process (the watcher thread, the database probe).
BENCH_SELF = "bench (this script)"
MACHINE = "machine (all processes)"
EVERYONE_ELSE = "everyone else"
PG_OURS = "postgres: our backends"
#: Followed by a role ("api-0"): that process's share of PG_OURS, by the application_name its connections carry.
PG_BACKENDS_OF = "postgres: backends of "
PG_BACKGROUND = "postgres: background (walwriter, checkpointer, ...; shared)"
PG_OTHERS = "postgres: other clients' backends"
REDIS = "redis (shared)"
LOADGEN = "loadgen"
PY_SPY = "py-spy"
#: Groups that are the measuring, not the measured.
INSTRUMENTS = (LOADGEN, PY_SPY, BENCH_SELF)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class LogProbe:
    """How far the exchange has come, read from its database (read-only queries, one connection).

    Counts the archive-naming events and the check outcomes incrementally, by
    position: appends are serialised, so a position once seen is committed
    with all before it.
    """

    ARCHIVE_EVENTS = ("released", "submitted", "feedback_released")
    OUTCOMES = ("archive_unpacked", "archive_rejected")

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from nbexchange.events.sql import events_table
        from nbexchange.projections import NAMES
        from nbexchange.projections.base import checkpoints_table
        from nbexchange.workers.tasks import SWEEP_CHECKPOINT

        self._sa = sa
        self.engine = sa.create_engine(url, pool_size=1, max_overflow=0)
        self.events = events_table
        self.checkpoints = checkpoints_table
        self.projections = NAMES
        self.sweep_name = SWEEP_CHECKPOINT
        self.seen = 0
        self.archives = 0
        self.outcomes = 0

    def __call__(self) -> dict[str, int]:
        sa, e = self._sa, self.events
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(e.c.position, e.c.type).where(e.c.position > self.seen)).all()
            marks = {row.name: int(row.position) for row in conn.execute(sa.select(self.checkpoints))}
            conn.rollback()
        for position, kind in rows:
            self.seen = max(self.seen, int(position))
            self.archives += kind in self.ARCHIVE_EVENTS
            self.outcomes += kind in self.OUTCOMES
        return {
            "head": self.seen,
            "archives": self.archives,
            "outcomes": self.outcomes,
            "projections": min((marks.get(name, 0) for name in self.projections), default=0),
            "sweep": marks.get(self.sweep_name, 0),
        }

    def backends(self, prefix: str) -> dict[str, list[int]]:
        """The pids of PostgreSQL backends whose ``application_name`` is ``<prefix>.<role>``, by role."""
        sa = self._sa
        out: dict[str, list[int]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT application_name, pid FROM pg_stat_activity WHERE starts_with(application_name, :p)"),
                {"p": f"{prefix}."},
            )
            for name, pid in rows:
                out.setdefault(name[len(prefix) + 1 :], []).append(int(pid))
            conn.rollback()
        return out

    def close(self) -> None:
        self.engine.dispose()


def settled(log: dict[str, int]) -> bool:
    """Every archive has its check outcome, and the projections and the sweep reached the log's head."""
    return log["outcomes"] >= log["archives"] and log["projections"] >= log["head"] and log["sweep"] >= log["head"]


class Watch:
    """A thread sampling each process group's CPU (and the log's progress) every ``interval`` seconds.

    ``groups`` names the pids of each group at the moment it is called; a
    process that appears between two samples counts whole (it started during
    the run), one that ends loses its last partial interval.
    """

    def __init__(
        self,
        groups: Callable[[], dict[str, list[int]]],
        log_probe: Callable[[], dict[str, int]] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.groups = groups
        self.log_probe = log_probe
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, int] = {}
        self.errors: list[str] = []
        self._last: dict[str, dict[int, float]] = {}
        self._cum: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def mark(self, label: str) -> None:
        """Take a sample now and remember it as ``label`` (a phase boundary)."""
        self.sample()
        self.marks[label] = len(self.samples) - 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            now = time.monotonic()
            groups = self.groups()
            groups[BENCH_SELF] = [os.getpid()]
            first = not self._last
            for name, pids in groups.items():
                before = self._last.get(name, {})
                current = {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}
                if not first:
                    grown = sum(cpu - before[pid] if pid in before else cpu for pid, cpu in current.items())
                    self._cum[name] = self._cum.get(name, 0.0) + grown
                else:
                    self._cum.setdefault(name, 0.0)
                self._last[name] = current
            machine = machine_busy_seconds()
            self._machine0 = getattr(self, "_machine0", machine)
            cum = dict(self._cum)
            cum[MACHINE] = machine - self._machine0
            log = None
            if self.log_probe is not None:
                try:
                    log = self.log_probe()
                except Exception as e:  # a busy database delays a sample's progress figures, not the run
                    self.errors.append(f"{type(e).__name__}: {e}"[:200])
            self.samples.append({"t": now, "cpu": cum, "log": log})

    def latest_log(self) -> dict[str, int] | None:
        return next((s["log"] for s in reversed(self.samples) if s["log"] is not None), None)

    def cores(self, names: list[str], last: int) -> list[float]:
        """The summed cores of these groups over each of the last ``last`` sampling intervals."""
        out = []
        for a, b in zip(self.samples[-last - 1 : -1], self.samples[-last:], strict=True):
            out.append(sum(b["cpu"].get(n, 0.0) - a["cpu"].get(n, 0.0) for n in names) / max(b["t"] - a["t"], 1e-6))
        return out


def wait_until_idle(
    watch: Watch,
    counted: list[str],
    is_settled: Callable[[dict[str, int] | None], bool],
    timeout: float,
    below: float = 0.05,
    steady: int = 3,
) -> dict[str, Any]:
    """Wait until ``is_settled`` holds for the latest progress and ``counted`` used under ``below`` cores
    in each of the last ``steady`` intervals; at most ``timeout`` seconds."""
    started = time.monotonic()
    settled_after = None
    while time.monotonic() - started < timeout:
        time.sleep(watch.interval)
        if settled_after is None and is_settled(watch.latest_log()):
            settled_after = round(time.monotonic() - started, 1)
        quiet = settled_after is not None and len(watch.samples) > steady
        if quiet and max(watch.cores(counted, steady)) < below:
            return {"idle": True, "seconds": round(time.monotonic() - started, 1), "settled_after_s": settled_after}
    return {
        "idle": False,
        "seconds": round(time.monotonic() - started, 1),
        "settled_after_s": settled_after,
        "last_log": watch.latest_log(),
        "last_cores": watch.cores(counted, 1) if len(watch.samples) > 1 else None,
    }


# -- the figures ---------------------------------------------------------------------


def phase_cost(watch: Watch, start: str, end: str, accepted: int, counted: list[str]) -> dict[str, Any]:
    """CPU of each group between two marks: seconds, cores, ms per accepted submission; ``counted`` summed."""
    a, b = watch.samples[watch.marks[start]], watch.samples[watch.marks[end]]
    seconds = b["t"] - a["t"]
    used = {name: b["cpu"].get(name, 0.0) - a["cpu"].get(name, 0.0) for name in b["cpu"]}
    sampled = sum(v for name, v in used.items() if name != MACHINE)
    used[EVERYONE_ELSE] = used.get(MACHINE, 0.0) - sampled

    def figures(cpu: float) -> dict[str, float | None]:
        return {
            "cpu_seconds": round(cpu, 2),
            "cores": round(cpu / seconds, 3) if seconds else None,
            "ms_per_submission": round(1000 * cpu / accepted, 2) if accepted else None,
        }

    out: dict[str, Any] = {"seconds": round(seconds, 1), "groups": {n: figures(v) for n, v in used.items()}}
    out["total"] = figures(sum(used.get(name, 0.0) for name in counted))
    out["counted"] = counted
    return out


def timeline(
    raw: dict[str, Any], watch: Watch, lags: list[tuple[float, float]], counted: list[str]
) -> list[dict[str, Any]]:
    """Per second since GO: accepts, their p99 latency, projection lag, events behind the head, checks, cores."""
    t0 = raw["t0_monotonic"]
    ok = [r for r in raw["records"] if r.get("status") in (200, 201)]
    end = max([watch.samples[-1]["t"] - t0, *(r["submit_end"] for r in ok)], default=0.0)
    bins: list[dict[str, Any]] = [{"t": i} for i in range(int(math.ceil(end)) + 1)]

    def at(t: float) -> dict[str, Any] | None:
        return bins[int(t)] if 0 <= t < len(bins) else None

    latencies: dict[int, list[float]] = {}
    for r in ok:
        latencies.setdefault(int(r["submit_end"]), []).append(r["submit_end"] - r["submit_start"])
    lag_by: dict[int, list[float]] = {}
    for answered, lag in lags:
        lag_by.setdefault(int(answered), []).append(lag)
    positions = sorted(raw.get("positions") or [])
    times = [t for t, _ in positions]
    behind: dict[int, int] = {}
    for t, head in raw.get("heads") or []:
        i = max(0, min(len(times), _bisect_right(times, t)) - 1)
        if positions:
            behind[int(t)] = max(behind.get(int(t), 0), head - positions[i][1])
    for b in bins:
        values = sorted(latencies.get(b["t"], []))
        b["accepted"] = len(values)
        b["p99_ms"] = round(1000 * pct(values, 99), 1) if values else None
        lag = sorted(lag_by.get(b["t"], []))
        b["lag_p99_ms"] = round(1000 * pct(lag, 99), 1) if lag else None
        b["events_behind_head"] = behind.get(b["t"])
    for a, s in zip(watch.samples, watch.samples[1:], strict=False):
        b = at(s["t"] - t0)
        if b is None or s["t"] <= a["t"]:
            continue
        span = s["t"] - a["t"]
        cores = {n: (s["cpu"].get(n, 0.0) - a["cpu"].get(n, 0.0)) / span for n in s["cpu"] if n != MACHINE}
        b["cores"] = {n: round(v, 3) for n, v in cores.items() if v > 0.005}
        b["cores_counted"] = round(sum(cores.get(n, 0.0) for n in counted), 3)
        if s["log"] is not None:
            b["checks_done"] = s["log"]["outcomes"]
            b["archives"] = s["log"]["archives"]
    return bins


def _bisect_right(values: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_right(values, x)


def _filled(bins: list[dict[str, Any]], key: str) -> list[Any]:
    """A cumulative count per bin, a bin without a sample taking the one before's."""
    out, last = [], None
    for b in bins:
        last = b.get(key, last)
        out.append(last)
    return out


def is_baseline(mode: str) -> bool:
    """Whether a run is one of the baseline's (``baseline``, ``baseline (after embedded)``, ...)."""
    return mode.startswith("baseline")


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """One column per mode: accepts/s, accept p99, projection lag, checks done, cores by process, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The baselines have no checks nor projections: their accept rate is in the tables.
    runs = [r for r in runs if r.get("timeline") and not is_baseline(r["mode"])]
    if not runs:
        return
    rows = 5
    fig, axes = plt.subplots(rows, len(runs), figsize=(5.2 * len(runs), 2.2 * rows), sharex="col", squeeze=False)
    for col, run in enumerate(runs):
        tl = run["timeline"]
        t = [b["t"] for b in tl]
        ax = axes[0][col]
        ax.bar(t, [b["accepted"] for b in tl], width=1.0, color="tab:blue")
        ax.set_title(f"{run['mode']}: {run['accepted']} accepted")
        ax.set_ylabel("accepted / s")
        ax = axes[1][col]
        ax.plot(t, [b["p99_ms"] for b in tl], ".", color="tab:red", markersize=3)
        ax.set_ylabel("accept p99 (ms)")
        ax = axes[2][col]
        ax.plot(
            t,
            [(b["lag_p99_ms"] or 0) / 1000 if b["lag_p99_ms"] is not None else None for b in tl],
            ".",
            color="tab:purple",
            markersize=3,
            label="lag p99 (s)",
        )
        ax.set_ylabel("projection lag p99 (s)")
        twin = ax.twinx()
        twin.plot(t, [b["events_behind_head"] for b in tl], "-", color="tab:gray", linewidth=0.8)
        twin.set_ylabel("events behind head", color="tab:gray")
        ax = axes[3][col]
        ax.plot(t, _filled(tl, "checks_done"), "-", color="tab:green", label="check outcomes")
        ax.plot(t, _filled(tl, "archives"), "--", color="tab:olive", linewidth=0.8, label="archives")
        ax.set_ylabel("events (cumulative)")
        ax.legend(loc="upper left", fontsize=7)
        ax = axes[4][col]
        used: dict[str, float] = {}
        for b in tl:
            for n, v in b.get("cores", {}).items():
                if n in run["cost"]["total"]["counted"]:
                    used[n] = used.get(n, 0.0) + v
        names = sorted(used, key=lambda n: -used[n])
        ax.stackplot(t, *[[b.get("cores", {}).get(n, 0.0) for b in tl] for n in names], labels=names)
        ax.set_ylabel("the exchange's CPU (cores)")
        ax.set_xlabel("seconds since the first arrival")
        ax.legend(loc="upper right", fontsize=6)
        for r in range(rows):
            for mark, style in (("uploads_done_s", ":"), ("idle_s", "-.")):
                if run.get(mark) is not None:
                    axes[r][col].axvline(run[mark], color="black", linestyle=style, linewidth=0.8)
    fig.suptitle(textwrap.fill(title, 60 * len(runs)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """``python bench/cost.py RESULTS.json OUT.png``: plot a run's timelines again."""
    import json
    import sys

    report = json.loads(Path(sys.argv[1]).read_text())
    argv = " ".join(report.get("argv", []))
    title = f"bench/deadline.py {argv} (commit {report['machine']['commit']}, {Path(sys.argv[1]).stem})"
    plot(report["runs"], Path(sys.argv[2]), title)


if __name__ == "__main__":
    main()
