"""What the benchmarks run on: starting and stopping servers, reading /proc, probing the disk's fsync.

Every process started here is remembered and stopped by :func:`stop_all`
(also at exit and on SIGTERM), by its own pid.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BASE_URL = "/services/nbexchange/"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_started: list[subprocess.Popen[bytes]] = []
#: Processes started under strace (see :func:`slow_fsync`): wrapper pid -> the server's pid.
_traced: dict[int, int] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    args: list[str], log: Path, fsync_delay_ms: float = 0, cpus: str | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start a process logging to ``log``; it is stopped by :func:`stop_all` whatever happens.

    With ``fsync_delay_ms``, it runs under :func:`slow_fsync`; :func:`server_pid`
    then names the process itself, not strace. With ``cpus`` (``taskset``'s
    list, e.g. ``"0"``) it and its threads run on those cores only (taskset
    execs the command: the pid is the process's own).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_"))}
    env["PYTHONUNBUFFERED"] = "1"
    out = open(log, "ab")  # noqa: SIM115 - the child's for its lifetime
    kwargs.setdefault("stdout", out)
    if fsync_delay_ms:
        args = slow_fsync(args, fsync_delay_ms)
    if cpus is not None:
        args = ["taskset", "-c", cpus, *args]
    proc = subprocess.Popen(args, stderr=out, env=env, cwd=ROOT, **kwargs)
    _started.append(proc)
    if fsync_delay_ms:
        _traced[proc.pid] = _only_child(proc)
    return proc


def slow_fsync(args: list[str], delay_ms: float) -> list[str]:
    """``args`` under strace, every fsync and fdatasync returning ``delay_ms`` later: a slow disk.

    strace's fault injection, with seccomp-bpf so that only those two system
    calls stop the process; everything else runs at full speed.
    """
    inject = f"inject=fsync,fdatasync:delay_exit={round(delay_ms * 1000)}"
    traced = ["-e", "trace=fsync,fdatasync", "-e", inject]
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", *traced, *args]


def _only_child(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args} started no process under strace")


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    """The pid of the server itself (under strace, strace's child)."""
    return _traced.get(proc.pid, proc.pid)


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL whoever is still there after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            # Under strace, the server itself: strace leaves when its child does.
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid(proc), signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid(proc), signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=10)
        if proc in _started:
            _started.remove(proc)
        _traced.pop(proc.pid, None)


def stop_all() -> None:
    stop(list(_started))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _on_sigterm)


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail early if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def write_users(path: Path, students: int, course: str) -> tuple[str, list[tuple[str, str]]]:
    """A users file with one instructor and ``students`` students: (instructor's token, [(student, token)])."""
    instructor = secrets.token_hex(16)
    names = [f"s{i:05d}" for i in range(students)]
    tokens = [secrets.token_hex(16) for _ in names]
    users = [{"name": "ada", "token": instructor, "full_name": "Ada Lovelace", "courses": {course: "Instructor"}}]
    users += [
        {
            "name": name,
            "token": token,
            "full_name": f"Student {name}",
            "email": f"{name}@example.org",
            "lms_user_id": f"lms-{name}",
            "courses": {course: "Student"},
        }
        for name, token in zip(names, tokens, strict=True)
    ]
    path.write_text(yaml.dump({"users": users}, Dumper=yaml.CSafeDumper))
    path.chmod(0o600)
    return instructor, list(zip(names, tokens, strict=True))


# -- /proc ---------------------------------------------------------------------------


@dataclass
class ProcSample:
    cpu_seconds: float
    rss_kb: int
    hwm_kb: int


def sample(pid: int) -> ProcSample:
    """CPU time (user + system) and memory of one process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # Fields after the command name start at field 3 (state): utime is 14, stime is 15.
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    memory = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory[key] = int(value.split()[0])
    return ProcSample(cpu, memory.get("VmRSS", 0), memory.get("VmHWM", 0))


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pids_named(name: str, cmdline: Callable[[str], bool] = lambda text: True) -> list[int]:
    """Every process whose command name is ``name`` (e.g. the shared PostgreSQL's backends), and whose
    command line (arguments joined by spaces) passes ``cmdline``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="ascii") as f:
                    if f.read().strip() != name:
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if cmdline(f.read().replace(b"\0", b" ").decode(errors="replace")):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, as they are now (a server's CPU includes any it starts)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    parent = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return sorted(found)


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of these processes (those that ended meanwhile are left out)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = sample(pid).cpu_seconds
        except OSError:
            continue
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), whoever used them."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time.
    return (sum(values[:8]) - idle) / CLOCK_TICKS


# -- the disk ------------------------------------------------------------------------


def fsync_probe(folder: Path, rounds: int = 200) -> dict[str, float]:
    """Latency of a 4 KiB write + fsync in ``folder`` (the disk the uploads go to): p50, p99, max in ms."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fsync-probe-{uuid.uuid4().hex}"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for _ in range(rounds):
            os.write(fd, os.urandom(4096))
            started = time.perf_counter()
            os.fsync(fd)
            times.append(1000 * (time.perf_counter() - started))
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "max_ms": times[-1], "rounds": rounds}


def pct(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def machine() -> dict[str, Any]:
    """What this machine is, for the report."""
    cpu = "?"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kb = int(f.readline().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "nbexchange"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024**2, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "commit": commit + ("+dirty(nbexchange/)" if dirty else ""),
        "loadavg": os.getloadavg(),
    }


@dataclass
class Servers:
    """The processes of one mode under test."""

    name: str
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    cleanup: list[Any] = field(default_factory=list)
    #: The database the servers use ("" for none), and the application_name their PostgreSQL connections carry.
    db_url: str = ""
    app_name: str = ""

    def pids(self) -> dict[str, int]:
        return {role: server_pid(proc) for role, proc in self.procs.items()}

    def stop(self) -> None:
        stop(list(self.procs.values()))
        for undo in reversed(self.cleanup):
            try:
                undo()
            except Exception as e:  # cleaning up must not hide the run's own outcome
                print(f"cleanup of {self.name} failed: {e}", file=sys.stderr)
