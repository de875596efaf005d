"""Clients of the several-hosts tests, run inside a namespace: ``python client.py COMMAND CONFIG.json``.

Commands (each prints one JSON line as its result; ``burst`` prints ``ACK``
lines while it runs, one per acknowledged submission, so that the test can
cut a host off mid-burst):

- ``release``: the instructor releases the assignment and waits until students see it;
- ``burst``: every student fetches it and submits, ``concurrency`` at a time; each
  submission carries an ``Idempotency-Key`` and is retried with the same key on a
  connection error or a 5xx answer, as the nbgrader plugin would be by its user;
- ``collections``: the instructor's list of submissions, once it reflects ``min_position``;
- ``ready``: the status of each of ``urls`` (the API hosts' ``ready``: database and broker reachable).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import requests

from nbexchange.plugin.exchange import RETRY_ERRORS, RETRY_STATUSES


def archive(text: str) -> bytes:
    """A small submission archive: one notebook holding ``text``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        data = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5, "text": text}).encode()
        info = tarfile.TarInfo("nb1.ipynb")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def release(cfg: dict[str, Any]) -> dict[str, Any]:
    url, params = cfg["url"], {"course_id": cfg["course_id"], "assignment_id": cfg["assignment_id"]}
    auth = {"Authorization": f"token {cfg['instructor_token']}"}
    answer = requests.post(
        url + "assignment",
        params=params,
        files={"assignment": ("release.tar.gz", archive("release"))},
        data={"notebooks": ["nb1"]},
        headers=auth,
        timeout=30,
    )
    answer.raise_for_status()
    position = answer.json()["position"]
    seen = requests.get(
        url + "assignments", params={"course_id": cfg["course_id"], "min_position": position}, headers=auth, timeout=60
    )
    seen.raise_for_status()
    return {"position": position}


def retried(call: Any, deadline: float) -> tuple[int, Any, int]:
    """``call()`` until its answer is not one the nbgrader plugin retries, or ``deadline`` passes.

    Returns (status or 0, JSON or what went wrong, attempts). The plugin's own
    policy: connection errors, 503 and a load balancer's 502 and 504 are tried
    again (with the same request, hence the same Idempotency-Key); anything
    else, a 500 included, is the answer.
    """
    attempts, last = 0, None
    while True:
        attempts += 1
        try:
            answer = call()
            if answer.status_code not in RETRY_STATUSES:
                body = answer.json() if "json" in answer.headers.get("Content-Type", "") else None
                return answer.status_code, body, attempts
            last = f"{answer.status_code}"
        except RETRY_ERRORS as e:
            last = f"{type(e).__name__}"
        if time.monotonic() > deadline:
            return 0, last, attempts
        time.sleep(min(2.0, 0.1 * attempts))


def burst(cfg: dict[str, Any]) -> dict[str, Any]:
    url, course, assignment = cfg["url"], cfg["course_id"], cfg["assignment_id"]
    deadline = time.monotonic() + cfg.get("give_up_after", 240)
    local = threading.local()
    lock = threading.Lock()

    def student(name: str, token: str) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        session: requests.Session = local.session
        params = {"course_id": course, "assignment_id": assignment}
        auth = {"Authorization": f"token {token}"}
        fetched = retried(lambda: session.get(url + "assignment", params=params, headers=auth, timeout=30), deadline)
        # A retry repeats the request exactly (its timestamp too): only then does the key name the same write.
        key, stamp = uuid.uuid4().hex, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
        body = archive(name)
        status, answer, attempts = retried(
            lambda: session.post(
                url + "submission",
                params={**params, "timestamp": stamp},
                files={"assignment": ("s.tar.gz", body)},
                headers={**auth, "Idempotency-Key": key},
                timeout=30,
            ),
            deadline,
        )
        if status in (200, 201):
            with lock:
                print("ACK", flush=True)
        return {
            "student": name,
            "fetch_status": fetched[0],
            "status": status,
            "position": answer.get("position") if isinstance(answer, dict) else None,
            "note": answer if not isinstance(answer, dict) else answer.get("note"),
            "attempts": attempts,
            "key": key,
        }

    with ThreadPoolExecutor(cfg["concurrency"]) as pool:
        results = list(pool.map(lambda s: student(*s), cfg["students"]))
    return {"results": results}


def collections(cfg: dict[str, Any]) -> dict[str, Any]:
    answer = requests.get(
        cfg["url"] + "collections",
        params={
            "course_id": cfg["course_id"],
            "assignment_id": cfg["assignment_id"],
            "min_position": cfg["min_position"],
        },
        headers={"Authorization": f"token {cfg['instructor_token']}"},
        timeout=120,
    )
    answer.raise_for_status()
    return dict(answer.json())


def ready(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"statuses": [requests.get(url, timeout=30).status_code for url in cfg["urls"]]}


COMMANDS = {"release": release, "burst": burst, "collections": collections, "ready": ready}


def main() -> None:
    command, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    print(json.dumps(COMMANDS[command](cfg)), flush=True)


if __name__ == "__main__":
    main()
