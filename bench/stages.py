"""Fold a py-spy profile of an exchange process into the named stages of a submission's cost.

``python bench/stages.py bench/results/profile-….txt [--role worker-0] [--cpu-seconds S --accepted N]``

Each sampled stack goes to the first stage in :data:`STAGES` one of whose
patterns matches one of its frames: the archive check's stages first, then
the projections, the committer, the accept path's, and the machinery under
all of them last. A pattern names a file (a path fragment), optionally a
function (a regular expression over ``Class.method`` for the exchange's own
code, read from the source with ``ast``), and optionally what the sampled
line's source holds (the hash and the file write happen in the same
function). A stage with no sample is not listed: when the code changes
(say, the check stops writing unpacked files), the table follows it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profile_top import _LINE, frame_name

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Pattern:
    file: str
    function: str = ""
    line: str = ""


def P(file: str, function: str = "", line: str = "") -> Pattern:  # noqa: N802 - reads as a table
    return Pattern(file, function, line)


ARCHIVES, TASKS = "nbexchange/workers/archives.py", "nbexchange/workers/tasks.py"
STORAGE, UPLOADS = "nbexchange/storage.py", "nbexchange/api/uploads.py"
BASE, EXCHANGE = "nbexchange/api/base.py", "nbexchange/exchange.py"
COMMIT = "append + commit (group committer: SQL, hash chain, JSON)"
PROBES = "reads (the benchmark's probes: collections, head)"
DISPATCH = "dispatch (check messages, wake-ups)"
FETCH = "fetch (GET assignment: decide, append, send)"
#: The stages of the accept path proper, by their names' beginning (with the fetch: a student's visit).
ACCEPT = ("accept: ", FETCH)

#: (stage, patterns), in order: a stack goes to the first stage one of whose patterns matches a frame.
STAGES: list[tuple[str, list[Pattern]]] = [
    ("check: read + decompress", [P(ARCHIVES, r"_Inflater\..*"), P(ARCHIVES, r"_Unpacked\._inflate")]),
    (
        "check: write unpacked files (open, write, fsync, rename)",
        [
            P(ARCHIVES, "_write_file"),
            P(ARCHIVES, "_copy", "out.write"),
            P(ARCHIVES, "unpack_archive", r"fsync_dir|os\.walk|os\.rename|mkdtemp|make_dirs|rmtree|chmod"),
            P(ARCHIVES, "_walk", "make_dirs"),
        ],
    ),
    ("check: hash", [P(STORAGE, r"ArchiveStore\.verify"), P(ARCHIVES, "", "sha256|digest")]),
    ("check: walk (tar headers, rules, members read)", [P(ARCHIVES), P("/tarfile.py")]),
    ("check: look-ups (the event, an earlier outcome)", [P(TASKS, "check_archive", r"store\.get|by_idempotency_key")]),
    ("check: append the outcome (build, hand to the committer)", [P(TASKS, "check_archive")]),
    (
        PROBES,
        [
            P("nbexchange/api/collections.py"),
            P("nbexchange/api/head.py"),
            P("nbexchange/anchors.py"),
            P(EXCHANGE, r"Exchange\.(collections|position|head|reached)"),
            P(BASE, r"BaseHandler\.read_position"),
        ],
    ),
    ("project (catch-up of the read models)", [P("nbexchange/projections/"), P(TASKS, "catch_up")]),
    ("sweep and blob collection", [P(TASKS, "sweep|collect|_advance")]),
    (COMMIT, [P("nbexchange/committer.py", r"GroupCommitter\.(_run|_commit)"), P("nbexchange/events/sql.py")]),
    (DISPATCH, [P("nbexchange/workers/app.py", r"Dispatcher\..*")]),
    (
        "accept: hash (sha256 of the upload)",
        [P(STORAGE, r"Upload\.write", "_digest"), P(STORAGE, r"Upload\.finish", "hexdigest")],
    ),
    (
        "accept: durable write (temp file, write, fsync, rename)",
        [
            P(STORAGE, r"Upload\..*"),
            P(STORAGE, "fsync_dir|make_dirs"),
            P(UPLOADS, r"UploadHandler\.(with_stored_upload|_received_upload)"),
        ],
    ),
    ("accept: parse (multipart)", [P("python_multipart/"), P(UPLOADS, r"FormStream\..*|_FilePart\..*|_ListPart\..*")]),
    (
        FETCH,
        [
            P(EXCHANGE, r"Exchange\.(fetch|_download|_live_release)"),
            P("nbexchange/api/assignment.py"),
            P(BASE, r"BaseHandler\.send_download"),
        ],
    ),
    (
        "accept: authorization (identity, may_submit, upload slots)",
        [
            P("nbexchange/identity/"),
            P(BASE, r"BaseHandler\.prepare"),
            P(UPLOADS, r"UploadHandler\.(prepare|take_upload_slot)|UploadSlots\..*"),
            P("nbexchange/api/submission.py", r"SubmissionHandler\.authorize_upload"),
            P(EXCHANGE, r"Exchange\.(may_submit|_submittable|_released|_check_clock|member|actor|assignment)"),
        ],
    ),
    (
        "accept: submit use case (decide, event, wait for the commit)",
        [P(EXCHANGE), P("nbexchange/committer.py", r"GroupCommitter\.append"), P("nbexchange/api/submission.py")],
    ),
    (
        "accept: response (answer, finish, log)",
        [
            P(BASE, r"BaseHandler\.(answer|on_finish|write_error|log_exception)"),
            P(UPLOADS, r"UploadHandler\.(on_finish|_received_all|on_connection_close)"),
            P("tornado/web.py", r"finish|flush|_log|log_request|send_error|write_error"),
            P("/logging/"),
        ],
    ),
    (
        "accept: receive (tornado, sockets, HTTP parsing)",
        [P("nbexchange/api/"), P("tornado/"), P("/asyncio/"), P("/selectors.py")],
    ),
    ("Celery, kombu, redis-py machinery", [P("celery/"), P("kombu/"), P("billiard/"), P("/redis/"), P("vine/")]),
    ("database driver, no exchange frame above", [P("sqlalchemy/"), P("sqlite3"), P("psycopg")]),
    ("executor and thread hand-offs", [P("concurrent/futures/"), P("/threading.py"), P("/queue.py")]),
]
OTHER = "other"

#: A thread whose innermost Python line is one of these is waiting (for a lock, a queue, a socket, the
#: database server, a timer, the disk's fsync), not using CPU: py-spy's --nonblocking sampling cannot
#: always tell. (SQLite's own fsync at commit is inside the driver's C: only --native shows it.)
IDLE_LINE = re.compile(
    r"fsync\(|fsync_dir\(|\.acquire\(|\bsleep\(|\.select\(|\.poll\(|\.wait\(|\bwait_c?\(|\.get\(block|\.recv(_into)?\(|\.accept\(|\.join\("
)
#: The same, for a native innermost frame (--native).
IDLE_NATIVE = re.compile(
    r"fsync|fdatasync|futex|epoll_wait|pthread_cond|__poll|\bpoll\b|select|nanosleep|sem_.*wait|recv"
)


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int
    text: str
    raw: str

    @property
    def native(self) -> bool:
        return not self.file.endswith(".py")


@functools.cache
def _source(file: str) -> tuple[list[str], list[tuple[int, int, str]]]:
    """A Python file's lines and its functions' (first line, last line, qualified name)."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError:
        return [], []
    spans: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, f"{name}.")

    with contextlib.suppress(SyntaxError):
        visit(ast.parse(text), "")
    return text.splitlines(), spans


@functools.cache
def parse_frame(raw: str) -> Frame:
    m = _FRAME.match(raw)
    if not m:
        return Frame(raw, "", 0, "", raw)
    file, line = m.group("file"), int(m.group("line") or 0)
    function, text = m.group("func"), ""
    if file.endswith(".py"):
        lines, spans = _source(file)
        if 0 < line <= len(lines):
            text = lines[line - 1]
    if file.endswith(".py") and "nbexchange/" in file:
        # The innermost function holding the line: its qualified name (``Upload.write``).
        short = function.rsplit(".", 1)[-1]  # py-spy 0.4 names methods ``Class.method`` already
        inner = [s for s in spans if s[0] <= line <= s[1] and s[2].rsplit(".", 1)[-1] == short]
        if inner:
            function = max(inner, key=lambda s: s[0])[2]
    return Frame(function, file, line, text, raw)


def _matches(pattern: Pattern, frame: Frame) -> bool:
    if pattern.file not in frame.file:
        return False
    if pattern.function and not re.fullmatch(pattern.function, frame.function):
        return False
    return not pattern.line or re.search(pattern.line, frame.text) is not None


def idle(frames: list[Frame]) -> bool:
    """Whether the sampled thread was waiting (see :data:`IDLE_LINE`)."""
    leaf = frames[-1]
    if leaf.native:
        return IDLE_NATIVE.search(leaf.function) is not None
    return IDLE_LINE.search(leaf.text) is not None


def classify(frames: list[Frame]) -> str:
    for stage, patterns in STAGES:
        if any(_matches(p, f) for f in frames for p in patterns):
            return stage
    return OTHER


def stage_name(stage: str, role: str) -> str:
    """In a worker process the committer only appends check outcomes."""
    if stage == COMMIT and role.startswith("worker"):
        return "check: append the outcome (group committer)"
    return stage


def breakdown(path: Path, role: str = "", cpu_seconds: float | None = None, accepted: int = 0) -> dict[str, Any]:
    """Samples per stage in one py-spy raw profile; ms per submission if the process's CPU is given."""
    counts: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    total = waiting = 0
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        count = int(m.group(2))
        frames = [parse_frame(f) for f in m.group(1).split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if idle(frames):
            waiting += count
            continue
        stage = stage_name(classify(frames), role)
        counts[stage] += count
        leaves.setdefault(stage, Counter())[frame_name(frames[-1].raw)] += count
        total += count
    stages = []
    for stage, n in counts.most_common():
        share = n / total if total else 0.0
        ms = round(1000 * share * cpu_seconds / accepted, 2) if cpu_seconds and accepted else None
        top = [f"{name} {c / n:.0%}" for name, c in leaves[stage].most_common(3)]
        stages.append({"stage": stage, "samples": n, "share": share, "ms_per_submission": ms, "top_leaves": top})
    return {"samples": total, "waiting_samples_dropped": waiting, "cpu_seconds": cpu_seconds, "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--role", default="", help="the process's role (worker-0: its committer appends check outcomes)")
    p.add_argument("--cpu-seconds", type=float, default=None, help="the process's CPU over the profile")
    p.add_argument("--accepted", type=int, default=0, help="accepted submissions over the profile")
    p.add_argument("--leaves", action="store_true", help="each stage's three hottest leaf frames too")
    args = p.parse_args()
    result = breakdown(args.profile, args.role, args.cpu_seconds, args.accepted)
    print(f"{result['samples']} samples on CPU ({result['waiting_samples_dropped']} waiting, left out)")
    for s in result["stages"]:
        ms = f"{s['ms_per_submission']:7.2f} ms/sub" if s["ms_per_submission"] is not None else ""
        print(f"  {100 * s['share']:5.1f}%  {ms}  {s['stage']}")
        if args.leaves:
            for leaf in s["top_leaves"]:
                print(f"{'':16}{leaf}")


if __name__ == "__main__":
    main()
