"""The load generator of ``bench/deadline.py``, run as its own process: ``python bench/loadgen.py CONFIG.json``.

It talks to its parent on stdin/stdout, one word a line: it prints ``READY``
once every body is built and every connection open, starts the clock when it
reads ``GO``, prints ``UPLOADS_DONE`` after the last answer to an upload and
``DONE`` when its results are written to the config's ``output`` file.

Scenarios (the config's ``scenario``):

- ``deadline``: each student fetches the assignment and submits an archive of
  ``size`` bytes, arriving on a schedule bunched toward the deadline and
  sharing ``concurrency`` keep-alive connections; meanwhile a probe reads the
  position the instructor's ``collections`` reflects, to time projection lag,
  and (every ``head_interval`` s) the log's head. With ``until_idle`` the
  probes go on after the uploads, until the parent, having seen the exchange
  settle and go idle, sends ``LIST``; only then is everything listed.
- ``bigupload``: one upload of ``big_size`` bytes streamed (never in memory),
  after an oversized one that must be refused before its body is sent.
- ``list``: ``requests`` timed ``collections`` GETs, one after the other.

Only 127.0.0.1 is ever contacted; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from http11 import Connection, Response, multipart
from payloads import SubmissionBodies, big_archive, big_archive_size, random_blob

#: A student id nobody has: its ``collections`` answer is tiny but carries the read position.
PROBE_USER = "bench-position-probe"


def say(word: str) -> None:
    print(word, flush=True)


async def wait_for_go(timeout: float = 600, word: str = "GO") -> None:
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout)
    if line.strip() != word:
        raise SystemExit(f"expected {word}, got {line!r}")


def idempotency_key() -> dict[str, str]:
    """The header nbgrader's plugin sends with each write, the fetch's included (``api_request``): the exchange
    looks every such key up in the log as it appends, so a load without them would skip that work."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def arrival_times(count: int, window: float) -> list[float]:
    """Arrival offsets in [0, window], density rising with t² toward the deadline at ``window``."""
    return [window * ((i + 0.5) / count) ** (1 / 3) for i in range(count)]


def nbgrader_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


class Target:
    """Routes of the service under test."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.port: int = cfg["port"]
        self.base: str = cfg["base_url"]
        self.course: str = cfg["course_id"]
        self.assignment: str = cfg["assignment_id"]

    def route(self, name: str, **params: str) -> str:
        query = {"course_id": self.course, "assignment_id": self.assignment, **params}
        return f"{self.base}{name}?{urlencode(query)}"


# -- deadline -----------------------------------------------------------------


async def deadline(cfg: dict[str, Any]) -> dict[str, Any]:
    target = Target(cfg)
    students: list[tuple[str, str]] = [tuple(s) for s in cfg["students"]]  # type: ignore[misc]
    concurrency: int = cfg["concurrency"]
    fetch: bool = cfg.get("fetch", True)
    # --no-keys: no header (as the passes before the eleventh measured).
    key_header = idempotency_key if cfg.get("idempotency_keys", True) else dict
    probe_token: str | None = cfg.get("instructor_token")
    lag_timeout: float = cfg.get("lag_timeout", 120.0)

    until_idle: bool = cfg.get("until_idle", False)

    built = time.perf_counter()
    archives = SubmissionBodies(cfg["size"], random_blob(cfg["size"]))
    bodies = [multipart("assignment", "submission.tar.gz", archives.parts(name)) for name, _ in students]
    build_seconds = time.perf_counter() - built
    archive_size = sum(len(part) for part in bodies[0][1][1:-1]) if bodies else 0

    conns = [Connection(target.port, timeout=cfg.get("request_timeout", 300.0)) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for c in conns:
        pool.put_nowait(c)
    probe = Connection(target.port, timeout=30.0) if probe_token else None
    if probe:
        await probe.open()

    say("READY")
    await wait_for_go()
    t0 = time.monotonic()
    offsets = arrival_times(len(students), cfg["window"])
    records: list[dict[str, Any]] = [{} for _ in students]
    busy_changes: list[tuple[float, int]] = []  # (time, +1 or -1): connections taken and given back

    async def student(i: int) -> None:
        name, token = students[i]
        rec = records[i]
        rec["name"] = name
        await asyncio.sleep(max(0.0, t0 + offsets[i] - time.monotonic()))
        rec["arrive"] = time.monotonic() - t0
        conn = await pool.get()
        busy_changes.append((time.monotonic() - t0, 1))
        auth = {"Authorization": f"token {token}"}
        try:
            if fetch:
                rec["fetch_start"] = time.monotonic() - t0
                got = await conn.request("GET", target.route("assignment"), {**auth, **key_header()})
                rec["fetch_end"] = time.monotonic() - t0
                rec["fetch_status"] = got.status
            content_type, parts = bodies[i]
            rec["submit_start"] = time.monotonic() - t0
            answer = await conn.request(
                "POST",
                target.route("submission", timestamp=nbgrader_now()),
                {**auth, **key_header(), "Content-Type": content_type},
                parts,
            )
            rec["submit_end"] = time.monotonic() - t0
            rec["status"] = answer.status
            if answer.status in (200, 201):
                rec["position"] = answer.json().get("position")
            else:
                rec["note"] = answer.body[:300].decode("utf-8", "replace")
        except Exception as e:  # a failed request is a result, not a crash
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["submit_end"] = time.monotonic() - t0
            await conn.close()
        finally:
            busy_changes.append((time.monotonic() - t0, -1))
            pool.put_nowait(conn)

    positions: list[tuple[float, int]] = []
    heads: list[tuple[float, int]] = []
    uploads_done = asyncio.Event()
    listing_due = asyncio.Event()
    probe_errors: list[str] = []

    async def probe_get(route: str, auth: dict[str, str]) -> Any:
        assert probe is not None
        try:
            answer = await probe.request("GET", route, auth)
            if answer.status == 200:
                return answer.json()
            probe_errors.append(f"{answer.status}")
        except Exception as e:
            probe_errors.append(f"{type(e).__name__}: {e}")
            await probe.close()
        return None

    async def probe_positions() -> None:
        route = target.route("collections", user_id=PROBE_USER)
        head_route = f"{target.base}head"
        auth = {"Authorization": f"token {probe_token}"}
        give_up = None
        head_at = -math.inf
        while True:
            answer = await probe_get(route, auth)
            if answer is not None:
                positions.append((time.monotonic() - t0, int(answer["position"])))
            if time.monotonic() - head_at >= cfg.get("head_interval", 0.25):
                head_at = time.monotonic()
                answer = await probe_get(head_route, auth)
                if answer is not None:
                    heads.append((time.monotonic() - t0, int(answer["position"])))
            if until_idle:
                if listing_due.is_set():
                    return
            elif uploads_done.is_set():
                wanted = max((r.get("position") or 0 for r in records), default=0)
                if positions and positions[-1][1] >= wanted:
                    return
                give_up = give_up or time.monotonic() + lag_timeout
                if time.monotonic() > give_up:
                    return
            # After the uploads, a slower probe: its requests would count as the burst's cost.
            slow = until_idle and uploads_done.is_set()
            await asyncio.sleep(cfg.get("probe_interval_after" if slow else "probe_interval", 0.5 if slow else 0.05))

    prober = asyncio.create_task(probe_positions()) if probe else None
    await asyncio.gather(*(student(i) for i in range(len(students))))
    uploads_done.set()
    say("UPLOADS_DONE")
    if until_idle:
        # The parent watches the exchange settle and its CPU go quiet; listing
        # 10,000 submissions before that would be counted as their cost.
        await wait_for_go(cfg.get("idle_timeout", 1800.0) + 60, "LIST")
        listing_due.set()
    if prober:
        await prober

    listing: dict[str, Any] = {}
    if probe:
        listing = await final_listing(probe, target, probe_token or "", records, t0, lag_timeout)
        listing["checks"] = await all_checked(probe, target, probe_token or "", t0, lag_timeout)
    for c in conns:
        await c.close()
    if probe:
        await probe.close()
    return {
        "t0_monotonic": t0,
        "build_seconds": build_seconds,
        "archive_size": archive_size,
        "records": records,
        "busy_changes": busy_changes,
        "positions": positions,
        "heads": heads,
        "probe_errors": probe_errors[:20],
        "probe_error_count": len(probe_errors),
        "listing": listing,
    }


async def final_listing(
    conn: Connection, target: Target, token: str, records: list[dict[str, Any]], t0: float, timeout: float
) -> dict[str, Any]:
    """List every submission until all accepted ones are there (or ``timeout``); count lost and duplicates."""
    accepted = {r["name"] for r in records if r.get("status") in (200, 201)}
    auth = {"Authorization": f"token {token}"}
    give_up = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        started = time.monotonic()
        answer = await conn.request("GET", target.route("collections"), auth)
        finished = time.monotonic()
        items = answer.json().get("value", []) if answer.status == 200 else []
        listed: dict[str, int] = {}
        for item in items:
            listed[item["student_id"]] = listed.get(item["student_id"], 0) + 1
        lost = sorted(accepted - set(listed))
        if not lost or finished > give_up:
            break
        await asyncio.sleep(0.1)
    return {
        "complete_at": finished - t0,
        "list_seconds": finished - started,
        "tries": tries,
        "items": len(items),
        "lost": len(lost),
        "lost_sample": lost[:10],
        "duplicates": sum(n - 1 for n in listed.values() if n > 1),
        "unacknowledged": len(set(listed) - accepted),
    }


async def all_checked(conn: Connection, target: Target, token: str, t0: float, timeout: float) -> dict[str, Any]:
    """List until no submission's archive check is pending (or ``timeout``): when, and the states."""
    auth = {"Authorization": f"token {token}"}
    give_up = time.monotonic() + timeout
    while True:
        answer = await conn.request("GET", target.route("collections"), auth)
        finished = time.monotonic()
        states: dict[str, int] = {}
        for item in answer.json().get("value", []) if answer.status == 200 else []:
            state = item["archive"]["state"]
            states[state] = states.get(state, 0) + 1
        if answer.status == 200 and not states.get("pending") or finished > give_up:
            return {"at": finished - t0, "states": states}
        await asyncio.sleep(0.25)


# -- bigupload ------------------------------------------------------------------


async def bigupload(cfg: dict[str, Any]) -> dict[str, Any]:
    target = Target(cfg)
    auth = {"Authorization": f"token {cfg['students'][0][1]}"}
    route = target.route("submission", timestamp=nbgrader_now())
    content_type, (before, _, after) = multipart("assignment", "big.tar.gz", b"")
    say("READY")
    await wait_for_go()
    out: dict[str, Any] = {}

    # 1. Declared larger than the limit: the answer must come before any body byte is sent.
    oversized = cfg["oversized_bytes"]
    conn = Connection(target.port, timeout=30)
    started = time.monotonic()
    try:
        assert conn.writer is None
        await conn.open()
        assert conn.writer is not None
        head = (
            f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {oversized}\r\n"
            f"Authorization: {auth['Authorization']}\r\nContent-Type: {content_type}\r\n\r\n"
        )
        conn.writer.write(head.encode())
        await conn.writer.drain()
        answer = await asyncio.wait_for(conn.read_response(), 10)
        out["oversized"] = {
            "declared": oversized,
            "status": answer.status,
            "body_bytes_sent": 0,
            "answered_in": time.monotonic() - started,
            "note": answer.json().get("note"),
        }
    except Exception as e:
        out["oversized"] = {"declared": oversized, "error": f"{type(e).__name__}: {e}"}
    finally:
        await conn.close()

    # 2. A big upload, streamed from a generator: the client never holds it either.
    data_size = cfg["big_size"] - cfg["big_size"] % 512
    size = big_archive_size(data_size)

    async def body() -> AsyncIterator[bytes]:
        yield before
        pieces: Iterator[bytes] = big_archive(data_size)
        for piece in pieces:
            yield piece
        yield after

    conn = Connection(target.port, timeout=cfg.get("request_timeout", 900.0))
    started = time.monotonic()
    try:
        answer = await conn.request(
            "POST",
            route,
            {**auth, "Content-Type": content_type, "Content-Length": str(len(before) + size + len(after))},
            stream=body(),
        )
        out["big"] = {
            "bytes": len(before) + size + len(after),
            "status": answer.status,
            "seconds": time.monotonic() - started,
            "answer": answer.json(),
        }
    except Exception as e:
        out["big"] = {"bytes": size, "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started}
    finally:
        await conn.close()
    say("UPLOADS_DONE")
    return out


# -- list -------------------------------------------------------------------------


async def list_scenario(cfg: dict[str, Any]) -> dict[str, Any]:
    target = Target(cfg)
    auth = {"Authorization": f"token {cfg['instructor_token']}"}
    conn = Connection(target.port, timeout=60)
    await conn.open()
    # One untimed request warms the connection and the server's caches, as any later request would find them.
    first: Response = await conn.request("GET", target.route("collections"), auth)
    say("READY")
    await wait_for_go()
    times = []
    items = len(first.json().get("value", []))
    size = len(first.body)
    statuses: dict[int, int] = {}
    for _ in range(cfg["requests"]):
        started = time.perf_counter()
        answer = await conn.request("GET", target.route("collections"), auth)
        times.append(time.perf_counter() - started)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
    await conn.close()
    say("UPLOADS_DONE")
    return {"times": times, "items": items, "bytes": size, "statuses": statuses}


SCENARIOS = {"deadline": deadline, "bigupload": bigupload, "list": list_scenario}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    result = asyncio.run(SCENARIOS[cfg["scenario"]](cfg))
    with open(cfg["output"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    say("DONE")


if __name__ == "__main__":
    main()
