"""A lost message, a restarted broker or a killed worker delays the exchange's work, never loses it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import service as service_module
import sqlalchemy as sa
from builders import UNREADABLE_PAX, make_archive, student
from httpclient import COURSE, course_events, get, ok, release, submit, until
from kombu import Connection
from servers import PostgresServer, RabbitMQServer, RedisServer, amqp_answers, redis_answers
from service import TEST_BROKER_URL, TEST_DB_URL, Service, free_port, replace_blob

from nbexchange.clock import format_timestamp
from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import INSTRUCTOR, Actor, Released, Submitted
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import AppendRequest, RecordedEvent
from nbexchange.projections import NAMES, checkpoints
from nbexchange.projections.collections import list_submissions
from nbexchange.storage import ArchiveStore, StoredArchive
from nbexchange.storage_s3 import S3ArchiveStore
from nbexchange.workers import tasks
from nbexchange.workers.app import FOLLOW_POLL_IDLE, Projector, Sweeper, is_rabbitmq
from nbexchange.workers.archives import ArchiveLimits

#: The multi-process tests run on PostgreSQL whatever NBEX_TEST_DB_URL says (SQLite is not the production topology).
PG_URL = TEST_DB_URL if TEST_DB_URL.startswith("postgresql") else "postgresql+psycopg://postgres@127.0.0.1:5432/test"

STUDENTS = [f"s{i}" for i in range(8)]
USERS = {"ada": {COURSE: "Instructor"}, **{name: {COURSE: "Student"} for name in STUDENTS}}
OUTCOMES = ("archive_unpacked", "archive_rejected")


# -- backends: PostgreSQL, the shared broker, a broker of the test's own ----------------


def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used, or ``None`` if it answers."""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        engine.dispose()
    return None


def _require_production_pass() -> None:
    """Skip unless this is a pass with a broker (Redis or RabbitMQ) and PostgreSQL answers."""
    if not TEST_BROKER_URL:
        pytest.skip("runs in the passes with a broker (PostgreSQL with Redis, or RabbitMQ)")
    problem = _postgres_problem()
    if problem:
        pytest.skip(f"PostgreSQL is unavailable at {PG_URL}: {problem}")


def _require_shared_broker() -> str:
    """The shared broker's URL; skip if it does not answer."""
    if is_rabbitmq(TEST_BROKER_URL):
        answers = amqp_answers(TEST_BROKER_URL)
    else:
        parts = urlsplit(TEST_BROKER_URL)
        answers = redis_answers(parts.hostname or "127.0.0.1", parts.port or 6379)
    if not answers:
        pytest.skip(f"The broker does not answer at {TEST_BROKER_URL}")
    return TEST_BROKER_URL


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch, exchange_service: Callable[..., Service]) -> Callable[..., Service]:
    """Factory: ``production(broker_url, **kwargs)`` starts a service on a PostgreSQL schema of its own."""
    _require_production_pass()
    # fresh_db_url and drop_db read this module global; monkeypatch undoes it only after
    # exchange_service has stopped its services and dropped their schemas.
    monkeypatch.setattr(service_module, "TEST_DB_URL", PG_URL)

    def start(broker_url: str, **kwargs: Any) -> Service:
        return exchange_service(USERS, broker_url=broker_url, extra=["--NbExchange.consistency_timeout=2"], **kwargs)

    return start


# -- submitting many, and checking the outcome -------------------------------------


@dataclass(frozen=True)
class Job:
    """One submission to send: who, with which client timestamp (unique), which bytes, which key."""

    student: str
    stamp: str
    archive: bytes
    key: str


def make_jobs(count: int, start: int = 0) -> list[Job]:
    """``count`` submissions by every student in turn, each with its own timestamp.

    Archives repeat (five per student), so the same bytes are checked at
    several positions, possibly by two workers at once.
    """
    base = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    jobs = []
    for i in range(start, start + count):
        name = STUDENTS[i % len(STUDENTS)]
        jobs.append(
            Job(
                student=name,
                stamp=format_timestamp(base + timedelta(microseconds=i)),
                archive=make_archive({"nb1.ipynb": f"{name} draft {i % 5}".encode()}),
                key=str(uuid.uuid4()),
            )
        )
    return jobs


def send(svc: Service, assignment: str, job: Job, attempts: int = 5) -> requests.Response:
    """Submit one job, retrying a dropped connection or a 503 with the same Idempotency-Key, as the plugin does."""
    for attempt in range(1, attempts + 1):
        try:
            answer = submit(svc, job.student, assignment, job.archive, key=job.key, stamp=job.stamp)
        except requests.ConnectionError:
            if attempt == attempts:
                raise
        else:
            if answer.status_code != 503 or attempt == attempts:
                return answer
        time.sleep(0.2 * attempt)  # back off before the retry; not an assertion
    raise AssertionError("unreachable")


def submit_all(svc: Service, assignment: str, jobs: list[Job], threads: int = 16) -> dict[Job, int]:
    """Send every job from ``threads`` threads; all must be accepted. Returns each job's position."""
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda job: send(svc, assignment, job), jobs))
    pairs = list(zip(jobs, answers, strict=True))
    failed = [(job.student, job.stamp, a.status_code, a.text) for job, a in pairs if a.status_code >= 300]
    assert not failed, f"{len(failed)} submissions not accepted, e.g. {failed[:3]}\n{svc.log_text()[-4000:]}"
    return {job: a.json()["position"] for job, a in pairs}


def release_and_wait(svc: Service, assignment: str) -> int:
    """Release ``assignment`` and wait until submissions to it are accepted (its release is projected)."""
    position = ok(release(svc, "ada", assignment), 201)["position"]

    def projected() -> bool:
        answer = get(svc, "assignments", "ada", course_id=COURSE, min_position=position)
        return answer.status_code == 200

    until(projected, 30, lambda: f"release at {position} never projected\n{svc.log_text()[-4000:]}")
    return int(position)


def settle(svc: Service, assignment: str, accepted: dict[Job, int], timeout: float) -> list[dict[str, Any]]:
    """Wait until every accepted submission is listed with its archive unpacked; return the listing."""
    head = max(accepted.values())
    state = {"seen": "nothing yet"}

    def listed() -> list[dict[str, Any]] | None:
        answer = get(svc, "collections", "ada", course_id=COURSE, assignment_id=assignment, min_position=head)
        if answer.status_code == 503:
            state["seen"] = f"projections not yet at position {head}"
            return None
        items = ok(answer)["value"]
        states = Counter(item["archive"]["state"] for item in items)
        state["seen"] = f"{len(items)} of {len(accepted)} listed, archive states {dict(states)}"
        assert not states["rejected"], [i["archive"] for i in items if i["archive"]["state"] == "rejected"][:3]
        return items if len(items) >= len(accepted) and states["unpacked"] == len(items) else None

    return until(
        listed, timeout, lambda: f"{state['seen']}\n--- service logs ---\n{svc.log_text()[-6000:]}", interval=0.25
    )


def assert_listed_once(items: list[dict[str, Any]], accepted: dict[Job, int]) -> None:
    """Every accepted submission is listed exactly once, and nothing else is."""
    listed = Counter((item["student_id"], item["timestamp"]) for item in items)
    expected = Counter((job.student, job.stamp) for job in accepted)
    missing, extra = expected - listed, listed - expected
    assert not missing and not extra, f"missing {list(missing)[:5]}, duplicated or unexpected {list(extra)[:5]}"


def assert_checked_once(svc: Service, assignment: str, accepted: dict[Job, int], release_position: int) -> None:
    """The log holds one submission per accepted job and exactly one archive outcome per archive-bearing event."""
    events = course_events(svc, "ada", assignment_id=assignment)
    submitted = sorted(e["position"] for e in events if e["type"] == "submitted")
    assert submitted == sorted(accepted.values()), "the log's submissions are not exactly the accepted ones"
    outcomes = [e for e in events if e["type"] in OUTCOMES]
    per_source = Counter(e["payload"]["source_position"] for e in outcomes)
    expected = Counter([release_position, *submitted])
    differ = {p: per_source[p] for p in sorted(set(per_source) | set(expected)) if per_source[p] != expected[p]}
    assert not differ, f"archive outcomes per source position, where not exactly one: {differ}"
    assert {e["type"] for e in outcomes} == {"archive_unpacked"}
    for e in outcomes:
        assert e["idempotency_key"] == tasks.outcome_key(e["payload"]["source_position"])


def verify_log(svc: Service) -> dict[str, Any]:
    """Run ``nbexchange verify`` with the service's own settings; return its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_"))}
    done = subprocess.run(
        [sys.executable, "-m", "nbexchange", "verify", *svc.flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, f"verify exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] is True, report
    return report


# -- 1. the production topology under a burst ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_apis_two_workers_lose_and_duplicate_nothing(production: Callable[..., Service]) -> None:
    svc = production(_require_shared_broker(), api_processes=2, workers=2)
    release_position = release_and_wait(svc, "ps-burst")
    accepted = submit_all(svc, "ps-burst", make_jobs(200), threads=16)
    assert len(set(accepted.values())) == len(accepted), "two submissions share a position"

    items = settle(svc, "ps-burst", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-burst", accepted, release_position)
    mine = ok(get(svc, "assignments", "s0", course_id=COURSE))["value"]
    assert [i["archive"]["state"] for i in mine if i["status"] == "released"] == ["unpacked"]

    report = verify_log(svc)
    distinct = len({job.archive for job in accepted}) + 1  # the release's archive too
    # The whole log: the release, 200 submissions, and one outcome for each.
    assert report["events"] == 2 * len(accepted) + 2 and report["archives"] == distinct, report


# -- 2. a worker killed with messages in hand -------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_worker_costs_latency_not_work(
    production: Callable[..., Service], own_broker: RedisServer | RabbitMQServer
) -> None:
    # A broker of its own: the dead worker's unacknowledged messages must not linger in the shared one.
    svc = production(own_broker.url, workers=1)
    (worker,) = [p for p in svc.procs if "worker" in p.args]  # type: ignore[operator]
    release_position = release_and_wait(svc, "ps-kill")
    jobs = make_jobs(60)

    def outcomes() -> int:
        return sum(e["type"] in OUTCOMES for e in course_events(svc, "ada", assignment_id="ps-kill"))

    with ThreadPoolExecutor(1) as background:
        sending = background.submit(submit_all, svc, "ps-kill", jobs, 4)
        # Kill as soon as the worker has recorded a submission's outcome (the release's is the first),
        # while submissions still arrive: it dies with prefetched, unacknowledged messages in hand.
        until(lambda: outcomes() > 1, 30, lambda: f"the worker never started\n{svc.log_text()[-4000:]}", interval=0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        at_kill = outcomes()
        accepted = sending.result(timeout=120)
    assert worker.returncode == -signal.SIGKILL
    assert at_kill < len(jobs) + 1, "the worker finished everything before it was killed: nothing was tested"

    svc.start_worker()
    items = settle(svc, "ps-kill", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-kill", accepted, release_position)


# -- 3. the broker killed mid-burst and started again (Redis loses its queue) ----------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_restarted_broker_costs_latency_not_work(
    production: Callable[..., Service], own_broker: RedisServer | RabbitMQServer
) -> None:
    svc = production(own_broker.url, workers=1)
    release_position = release_and_wait(svc, "ps-restart")
    jobs = make_jobs(60)

    accepted = submit_all(svc, "ps-restart", jobs[:20], threads=8)
    own_broker.kill()
    until(lambda: get(svc, "ready", None).status_code == 503, 15, "the API never noticed the broker was gone")
    started = time.monotonic()
    # The write is committed before any message is sent: with no broker at all, submissions still succeed.
    accepted |= submit_all(svc, "ps-restart", jobs[20:40], threads=8)
    outage = time.monotonic() - started
    assert outage < 30, f"20 submissions took {outage:.1f} s without a broker: the accept path waits on it"
    own_broker.start()
    until(lambda: get(svc, "ready", None).status_code == 200, 15, "the API never reached the restarted broker")
    accepted |= submit_all(svc, "ps-restart", jobs[40:], threads=8)

    items = settle(svc, "ps-restart", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-restart", accepted, release_position)
    assert all(p.poll() is None for p in svc.procs), f"a process died with the broker:\n{svc.log_text()[-4000:]}"


# -- 3b. messages lost in the broker (purged): the sweep does what they asked for ------------


def waiting_in(svc: Service) -> int:
    """Messages ready in the service's queue, as the broker counts them (0 if the queue is not declared yet)."""
    with Connection(svc.broker_url, connect_timeout=2) as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=svc.queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_messages_lost_in_the_broker_cost_latency_not_work(production: Callable[..., Service]) -> None:
    svc = production(_require_shared_broker(), workers=1)
    (worker,) = [p for p in svc.procs if "worker" in p.args]  # type: ignore[operator]
    release_position = release_and_wait(svc, "ps-lost")
    until(lambda: any(e["type"] in OUTCOMES for e in course_events(svc, "ada", assignment_id="ps-lost")), 30)
    # No worker: the check messages of these submissions wait in the queue, none in a worker's hands.
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    accepted = submit_all(svc, "ps-lost", make_jobs(24), threads=4)
    until(lambda: waiting_in(svc) >= 3, 30, "the check messages never reached the queue")  # 24 archives, 8 a message
    with Connection(svc.broker_url, connect_timeout=2) as conn:
        purged = conn.default_channel.queue_purge(svc.queue)
    assert purged >= 3 and waiting_in(svc) == 0, purged

    svc.start_worker()
    items = settle(svc, "ps-lost", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-lost", accepted, release_position)


# -- 4. PostgreSQL restarted: the checks it failed are retried, not left to the sweep ---------


def _log_of(svc: Service, proc: subprocess.Popen[bytes]) -> str:
    """What one of the service's processes logged."""
    return svc.logs[svc.procs.index(proc)].read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_checks_failed_by_a_database_outage_are_retried_soon_after_it_ends(
    own_postgres: PostgresServer,
    own_broker: RedisServer | RabbitMQServer,
    monkeypatch: pytest.MonkeyPatch,
    exchange_service: Callable[..., Service],
) -> None:
    # (The servers come first: they must outlive the service and its schema.)
    # fresh_db_url makes the service's schema in this module global's database: the test's own cluster.
    monkeypatch.setattr(service_module, "TEST_DB_URL", own_postgres.url)
    # The sweep runs at the worker's start, then every 10 minutes: it cannot be what checks these archives.
    extra = ["--NbExchange.sweep_interval=600", "--NbExchange.log_level=INFO"]
    svc = exchange_service(USERS, broker_url=own_broker.url, workers=1, extra=extra)
    (worker,) = [p for p in svc.procs if "worker" in p.args]  # type: ignore[operator]
    release_position = release_and_wait(svc, "ps-db")
    until(lambda: any(e["type"] in OUTCOMES for e in course_events(svc, "ada", assignment_id="ps-db")), 30)

    # Frozen, the worker takes no check before the database is gone; the messages wait for it.
    worker.send_signal(signal.SIGSTOP)
    try:
        accepted = submit_all(svc, "ps-db", make_jobs(8), threads=4)
        own_postgres.stop()
    finally:
        worker.send_signal(signal.SIGCONT)
    try:
        # Each check fails on the outage and goes back to the queue, again and again while it lasts.
        until(
            lambda: _log_of(svc, worker).count("retry: Retry in") >= 3,
            30,
            lambda: f"the failed checks were not retried\n{_log_of(svc, worker)[-4000:]}",
        )
    finally:
        own_postgres.start()
    back = time.monotonic()
    items = settle(svc, "ps-db", accepted, timeout=60)
    took = time.monotonic() - back
    # Retried within CHECK_RETRY_MAX (5 s) of each other, with room for a slow machine; the sweep is 600 s away.
    assert took < 20, f"the checks finished {took:.1f} s after the database came back"
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-db", accepted, release_position)
    assert worker.poll() is None, f"the worker died with the database:\n{_log_of(svc, worker)[-4000:]}"


# -- 5. the broker down: the API says so once, and once when it is back ----------------------


def _problems(text: str) -> list[str]:
    """The log lines at WARNING or above (the format's ``[W``, ``[E``, ``[C``), tracebacks left out."""
    return [line for line in text.splitlines() if line.startswith(("[W ", "[E ", "[C "))]


def _broker_back(lines: list[str]) -> list[str]:
    """The lines that log an outage's end (not "takes messages again" alone: its start says "until it …")."""
    return [line for line in lines if "The broker takes messages again" in line]


def _queue_state(url: str, queue: str) -> tuple[int, int] | None:
    """A RabbitMQ queue's ready messages and consumers, or ``None`` while the node does not say."""
    try:
        with Connection(url, connect_timeout=3, transport_options={"confirm_publish": False}) as conn:
            ok = conn.default_channel.queue_declare(queue, passive=True)
    except Exception:
        return None
    return ok.message_count, ok.consumer_count


def _consumed(url: str, queue: str) -> bool:
    """Whether a worker consumes from ``queue`` and nothing waits in it."""
    return _queue_state(url, queue) in {(0, n) for n in range(1, 10)}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_broker_outage_is_logged_once_and_its_end_once(
    own_broker: RedisServer | RabbitMQServer, exchange_service: Callable[..., Service]
) -> None:
    svc = exchange_service(USERS, broker_url=own_broker.url, workers=1)
    api, worker = svc.procs
    release_and_wait(svc, "ps-broker")
    rabbitmq = isinstance(own_broker, RabbitMQServer)
    if rabbitmq:
        # A RabbitMQ node (3.10) killed within a second or two of creating a quorum queue restarts
        # without the queue's Raft member on disk: the queue comes back without a leader and takes
        # nothing, ever (rabbitmq-server#10070), whatever its clients do. A broker that crashes in
        # production has held its queues for long: here, once the worker consumes (its own queues
        # declared too), a clean restart writes them all down.
        until(lambda: _consumed(own_broker.url, svc.queue), 30, "the worker never consumed")
        own_broker.stop()
        own_broker.start()
        until(lambda: _consumed(own_broker.url, svc.queue), 60, lambda: _log_of(svc, worker)[-4000:])
    accepted = submit_all(svc, "ps-broker", make_jobs(4), threads=1)
    before = len(_problems(_log_of(svc, api)))

    own_broker.kill()
    # Many commit batches while the broker is away: spread over several seconds, then a burst.
    jobs = make_jobs(40, start=4)
    for job in jobs[:10]:
        accepted |= submit_all(svc, "ps-broker", [job], threads=1)
        time.sleep(0.5)
    accepted |= submit_all(svc, "ps-broker", jobs[10:30], threads=8)
    own_broker.start()
    # The outage's end shows at the first message sent after it: a few more commits.
    accepted |= submit_all(svc, "ps-broker", jobs[30:], threads=1)

    def logged() -> list[str]:
        return _problems(_log_of(svc, api))[before:]

    until(lambda: _broker_back(logged()), 60, lambda: "\n".join(logged()))
    back = _broker_back(logged())
    if rabbitmq:
        # What went to the restarted node reaches the worker: none of it stays in the queue.
        until(lambda: _consumed(own_broker.url, svc.queue), 60, lambda: _log_of(svc, worker)[-4000:])
    # What the broker did not carry, the sweep checked: nothing was lost.
    assert_listed_once(settle(svc, "ps-broker", accepted, timeout=60), accepted)
    assert worker.poll() is None, f"the worker died with the broker:\n{_log_of(svc, worker)[-4000:]}"
    lines = logged()
    down = [line for line in lines if "Could not send to the broker" in line]
    assert len(down) == 1, "\n".join(lines)
    assert lines == [*down, *back], "other warnings during the outage:\n" + "\n".join(lines)


# -- 5b. RabbitMQ refuses messages: publisher confirms say so, and the sweep does the work ------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_messages_rabbitmq_refuses_are_logged_once_and_their_checks_swept(
    own_rabbitmq: RabbitMQServer, exchange_service: Callable[..., Service]
) -> None:
    """Without confirms a refused publish is dropped unseen; with them it fails, and is logged as an outage."""
    if not is_rabbitmq(TEST_BROKER_URL):
        pytest.skip("runs in the RabbitMQ pass")
    svc = exchange_service(USERS, broker_url=own_rabbitmq.url, workers=1)
    api, worker = svc.procs
    release_position = release_and_wait(svc, "ps-refused")
    until(lambda: any(e["type"] in OUTCOMES for e in course_events(svc, "ada", assignment_id="ps-refused")), 30)
    worker.send_signal(signal.SIGKILL)  # nothing takes messages out of the queue now
    worker.wait(timeout=10)
    before = len(_problems(_log_of(svc, api)))

    # A length limit of 0 that refuses what comes over it: the broker nacks every publish but the first.
    policy = '{"max-length": 0, "overflow": "reject-publish"}'
    done = own_rabbitmq.ctl("set_policy", "refuse", f"^{svc.queue}$", policy, "--apply-to", "queues")
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = make_jobs(12)
    accepted: dict[Job, int] = {}
    for job in jobs[:8]:  # one commit, and one message, each
        accepted |= submit_all(svc, "ps-refused", [job], threads=1)

    def logged() -> list[str]:
        return _problems(_log_of(svc, api))[before:]

    until(lambda: any("MessageNacked" in line for line in logged()), 15, lambda: "\n".join(logged()))
    done = own_rabbitmq.ctl("clear_policy", "refuse")
    assert done.returncode == 0, done.stdout + done.stderr
    svc.start_worker()
    accepted |= submit_all(svc, "ps-refused", jobs[8:], threads=1)
    until(lambda: _broker_back(logged()), 15, lambda: "\n".join(logged()))
    lines = logged()
    assert len(lines) == 2, "\n".join(lines)
    assert "Could not send to the broker" in lines[0] and "MessageNacked" in lines[0], lines[0]
    assert "The broker takes messages again" in lines[1], lines[1]
    # What the broker refused, the sweep checked: nothing was lost.
    items = settle(svc, "ps-refused", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-refused", accepted, release_position)


# -- 5c. RabbitMQ takes messages but never confirms them: each send gives up in bounded time ---

#: The test's publish_confirm_timeout (seconds): small, so that the bound below is far from a minute.
CONFIRM_TIMEOUT = 1.0


def _suspend_queue(rabbitmq: RabbitMQServer, queue: str, how: str) -> None:
    """``sys:suspend`` or ``sys:resume`` the Raft member of a quorum queue on a one-node RabbitMQ.

    Suspended, it takes no command: the node accepts each publish and never
    confirms it, and answers a channel's close only when it gives up on
    what the channel published, about a minute later, as with a quorum
    queue without a leader (rabbitmq-server#10070) or a cluster that lost
    its majority, but at once and every time.
    """
    member = f"'%2F_{queue}'"  # the Ra server's registered name: the vhost (/, quoted) and the queue's name
    done = rabbitmq.ctl("eval", f"sys:{how}(whereis({member})).")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_send_rabbitmq_never_confirms_gives_up_within_a_few_confirm_timeouts(
    own_rabbitmq: RabbitMQServer, exchange_service: Callable[..., Service]
) -> None:
    if not is_rabbitmq(TEST_BROKER_URL):
        pytest.skip("runs in the RabbitMQ pass")
    extra = [f"--NbExchange.publish_confirm_timeout={CONFIRM_TIMEOUT}"]
    svc = exchange_service(USERS, broker_url=own_rabbitmq.url, workers=1, extra=extra)
    api, worker = svc.procs
    release_position = release_and_wait(svc, "ps-unconfirmed")
    until(lambda: _consumed(own_rabbitmq.url, svc.queue), 30, lambda: _log_of(svc, worker)[-4000:])
    before = len(_problems(_log_of(svc, api)))

    def logged() -> list[str]:
        return _problems(_log_of(svc, api))[before:]

    def down() -> list[str]:
        return [line for line in logged() if "Could not send to the broker" in line]

    _suspend_queue(own_rabbitmq, svc.queue, "suspend")
    jobs = make_jobs(12)
    accepted: dict[Job, int] = {}
    try:
        sent = time.monotonic()
        # One commit, and one send, each; they are answered while the dispatcher waits on the broker.
        for job in jobs[:6]:
            began = time.monotonic()
            accepted |= submit_all(svc, "ps-unconfirmed", [job], threads=1)
            assert time.monotonic() - began < 5, f"an upload waited {time.monotonic() - began:.1f} s"
        # At most five waits of CONFIRM_TIMEOUT: three tries unconfirmed, then the channel's and the
        # connection's close; the rest is the retries' pauses and a loaded machine. Without bounds on
        # the close, the broker answers it after about a minute.
        bound = 5 * CONFIRM_TIMEOUT + 5
        until(down, bound, lambda: f"no outage logged within {bound} s\n" + "\n".join(logged()))
        took = time.monotonic() - sent
        assert took < bound, took
    finally:
        _suspend_queue(own_rabbitmq, svc.queue, "resume")
    # The outage's end shows at the first message sent after it: a few more commits.
    for job in jobs[6:]:
        accepted |= submit_all(svc, "ps-unconfirmed", [job], threads=1)
    until(lambda: _broker_back(logged()), 60, lambda: "\n".join(logged()))
    # What the broker takes now reaches the worker: none of it stays in the queue.
    until(lambda: _consumed(own_rabbitmq.url, svc.queue), 60, lambda: _log_of(svc, worker)[-4000:])
    # What the broker never confirmed, the sweep checked: nothing was lost.
    items = settle(svc, "ps-unconfirmed", accepted, timeout=60)
    assert_listed_once(items, accepted)
    assert_checked_once(svc, "ps-unconfirmed", accepted, release_position)
    assert worker.poll() is None, f"the worker died:\n{_log_of(svc, worker)[-4000:]}"
    lines = logged()
    assert len(down()) == 1, "\n".join(lines)
    assert "timed out" in down()[0], down()[0]
    assert lines == [*down(), *_broker_back(lines)] and len(lines) == 2, "other warnings:\n" + "\n".join(lines)


# -- 6. embedded mode: the task functions called directly ----------------------------------

T0 = datetime(2026, 1, 31, 23, 0, tzinfo=timezone.utc)
TEACHER = Actor(name="ada", role=INSTRUCTOR)


@dataclass
class Context:
    """What the tasks run against, without a broker: the store appends directly."""

    engine: sa.Engine
    store: SQLEventStore
    appender: SQLEventStore
    archives: ArchiveStore
    limits: ArchiveLimits
    sweep_grace: float
    #: What the broker would say; ``None``: it cannot say (the sweep then checks).
    waiting: int | None = None
    blob_grace: float = 3600.0
    #: Whether a sweep also runs the blob collector.
    collecting: bool = False

    def queue_depth(self) -> int | None:
        return self.waiting

    def collection_due(self) -> bool:
        return self.collecting


@pytest.fixture
def ctx(engine: sa.Engine, archive_store: ArchiveStore) -> Context:
    store = SQLEventStore(engine)
    return Context(engine, store, store, archive_store, ArchiveLimits(), sweep_grace=0)


def stored(ctx: Context, content: bytes, pax_headers: dict[str, str] | None = None) -> StoredArchive:
    return ctx.archives.store_bytes(make_archive({"nb1.ipynb": content}, pax_headers))


def append_release(ctx: Context, assignment: str = "ps1") -> RecordedEvent:
    """Append a release, sending no message (as if it was lost)."""
    archive = stored(ctx, b"release")
    event = Released(1, COURSE, assignment, ("nb1",), archive.sha256, archive.size)
    return ctx.store.append(AppendRequest(event, TEACHER)).event


def append_submission(
    ctx: Context, name: str, content: bytes, assignment: str = "ps1", pax_headers: dict[str, str] | None = None
) -> RecordedEvent:
    """Append a submission whose archive is stored, sending no message (as if it was lost)."""
    archive = stored(ctx, content, pax_headers)
    event = Submitted(
        1, COURSE, assignment, name, timestamp=T0, archive_sha256=archive.sha256, archive_size=archive.size
    )
    return ctx.store.append(AppendRequest(event, student(name))).event


def outcomes_of(ctx: Context, position: int) -> list[RecordedEvent]:
    return [e for e in ctx.store.read() if e.type in OUTCOMES and e.payload["source_position"] == position]


def test_a_sweep_while_the_archive_store_is_away_logs_a_line_and_loses_nothing(
    ctx: Context, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage of the store (a real S3 client on a port nobody answers) is expected: one warning line per
    failed piece of the sweep, with its note, no traceback; the next sweep with the store back does the work."""
    released = append_release(ctx)
    submitted = append_submission(ctx, "s1", b"my work")
    present = ctx.archives
    ctx.archives = S3ArchiveStore(
        bucket="nbx-away", tmp=tmp_path / "tmp", endpoint_url=f"http://127.0.0.1:{free_port()}", create=False
    )
    ctx.collecting = True
    with caplog.at_level(logging.WARNING):
        tasks.sweep(ctx)
    failures = [r for r in caplog.records if r.name == tasks.__name__]
    assert [r.getMessage().split(" (")[0] for r in failures] == [
        f"Sweep stopped after position {released.position - 1}; it will retry from there",
        "Blob collection failed; it runs again at its next interval",
    ]
    assert all("unreachable" in r.getMessage() and r.exc_info is None for r in failures), failures
    assert ctx.store.by_idempotency_key(tasks.outcome_key(released.position)) is None

    ctx.archives, ctx.collecting = present, False
    tasks.sweep(ctx)
    for source in (released, submitted):
        outcome = ctx.store.by_idempotency_key(tasks.outcome_key(source.position))
        assert outcome is not None and outcome.type == "archive_unpacked", outcome


def test_sweep_does_what_a_lost_message_would_have(ctx: Context) -> None:
    released = append_release(ctx)
    submitted = append_submission(ctx, "s1", b"my work")

    tasks.sweep(ctx)

    for source in (released, submitted):
        outcome = ctx.store.by_idempotency_key(tasks.outcome_key(source.position))
        assert outcome is not None and outcome.type == "archive_unpacked", outcome
        assert outcome.payload["source_position"] == source.position
        assert outcome.payload["notebooks"] == ["nb1"]
    head = ctx.store.head()
    marks = checkpoints(ctx.engine)
    assert {name: marks[name] for name in NAMES} == dict.fromkeys(NAMES, head)
    with ctx.engine.connect() as conn:
        rows = list_submissions(conn, 1, COURSE, "ps1")
    assert [(r["position"], r["archive_state"], r["notebooks"]) for r in rows] == [
        (submitted.position, "unpacked", ("nb1",))
    ]

    tasks.sweep(ctx)
    assert ctx.store.head() == head, "a second sweep appended to the log"


def test_check_archive_records_one_outcome_however_often_it_runs(ctx: Context) -> None:
    first = append_submission(ctx, "s1", b"once")
    one = tasks.check_archive(ctx, first.position)
    two = tasks.check_archive(ctx, first.position)
    assert one is not None and two is not None and one.position == two.position
    assert len(outcomes_of(ctx, first.position)) == 1

    # A redelivered message racing the sweep: several checks of one position at once.
    raced = append_submission(ctx, "s2", b"raced")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: tasks.check_archive(ctx, raced.position), range(4)))
    assert {r.position for r in results if r is not None} == {outcomes_of(ctx, raced.position)[0].position}
    assert len(outcomes_of(ctx, raced.position)) == 1

    head = ctx.store.head()
    tasks.sweep(ctx)  # the sweep finds both already checked
    assert ctx.store.head() == head


class CountingAppender:
    """The store as appender, counting the batches it commits."""

    def __init__(self, store: SQLEventStore) -> None:
        self.store = store
        self.batches: list[int] = []

    def append(self, request: AppendRequest) -> Any:
        return self.append_batch([request])[0]

    def append_batch(self, requests: Any) -> Any:
        self.batches.append(len(requests))
        return self.store.append_batch(requests)


def test_a_message_of_checks_reads_and_commits_once_and_skips_what_is_done(ctx: Context) -> None:
    released = append_release(ctx)
    submitted = [append_submission(ctx, f"s{i}", f"work {i}".encode()) for i in range(6)]
    tasks.check_archive(ctx, submitted[2].position)  # one of them checked already (a redelivered message)
    ctx.appender = counting = CountingAppender(ctx.store)  # type: ignore[assignment]
    statements: list[str] = []
    sa.event.listen(ctx.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    positions = [released.position, *(s.position for s in submitted)]
    outcomes = tasks.check_archives(ctx, positions)

    assert sorted(outcomes) == positions
    assert counting.batches == [6]  # the five unchecked submissions and the release, in one commit
    reads = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    # The events, the outcomes done; then the append's own: PostgreSQL's lock, the head, the versions, the keys.
    assert len(reads) <= 2 + 4, reads  # however many archives the message names
    assert all(len(outcomes_of(ctx, p)) == 1 for p in positions)
    assert tasks.check_archives(ctx, positions) == outcomes  # again: nothing new
    assert counting.batches == [6, 0]


def test_a_failure_in_a_message_of_checks_keeps_the_outcomes_decided_before_it(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = [append_submission(ctx, f"s{i}", f"work {i}".encode()) for i in range(4)]
    broken = submitted[2].payload["archive_sha256"]
    real_open = ctx.archives.open

    def failing_disk(sha256: str) -> Any:
        if sha256 == broken:
            raise OSError(5, "Input/output error")
        return real_open(sha256)

    monkeypatch.setattr(ctx.archives, "open", failing_disk)
    with pytest.raises(OSError):
        tasks.check_archives(ctx, [s.position for s in submitted])
    assert [len(outcomes_of(ctx, s.position)) for s in submitted] == [1, 1, 0, 0]
    monkeypatch.setattr(ctx.archives, "open", real_open)
    assert sorted(tasks.check_archives(ctx, [s.position for s in submitted])) == [s.position for s in submitted]
    assert [len(outcomes_of(ctx, s.position)) for s in submitted] == [1, 1, 1, 1]


def test_a_sweep_reads_and_commits_per_batch_of_archives_not_per_archive(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst every archive has been checked by its message, and the sweep passes over all of them: that
    costs the same statements for 3 archives as for 40 (it cost four per archive, a third of a worker's round trips
    in a 3,000-student burst). Archives no message checked are checked and committed a batch at a time."""
    ctx.appender = counting = CountingAppender(ctx.store)  # type: ignore[assignment]
    monkeypatch.setattr(tasks, "SWEEP_BATCH", 5)
    append_release(ctx)
    lost = [append_submission(ctx, f"lost{i}", f"work {i}".encode()) for i in range(11)]
    tasks.sweep(ctx)  # no message came for any of the twelve
    assert counting.batches == [5, 5, 2]
    assert all(len(outcomes_of(ctx, s.position)) == 1 for s in lost)

    monkeypatch.setattr(tasks, "SWEEP_BATCH", 500)
    statements: list[str] = []
    sa.event.listen(ctx.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    sent = {}
    for burst in (3, 40):
        checked = [append_submission(ctx, f"b{burst}-{i}", f"burst {i}".encode()) for i in range(burst)]
        tasks.check_archives(ctx, [s.position for s in checked])  # their messages came
        counting.batches.clear()
        statements.clear()
        assert tasks.sweep(ctx) >= checked[-1].position
        sent[burst] = len(statements)
        assert not any(counting.batches)  # nothing to append: each outcome found by its key
    assert sent[3] == sent[40], sent


def events_the_sweep_reads(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The positions of the events the sweep is given by the store from now on (filled as it reads)."""
    read = ctx.store.read
    positions: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        for event in read(*args, **kwargs):
            positions.append(event.position)
            yield event

    monkeypatch.setattr(ctx.store, "read", counted)
    return positions


def test_sweep_leaves_young_events_to_their_messages_and_comes_back_for_them(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    young = [append_submission(ctx, f"s{i}", b"young") for i in range(30)]
    submitted = young[0]
    ctx.sweep_grace = 3600
    read = events_the_sweep_reads(ctx, monkeypatch)
    tasks.sweep(ctx)
    assert read == []  # in a burst, the young events are not read from the database to be dropped
    monkeypatch.undo()
    assert outcomes_of(ctx, submitted.position) == []
    # Its checkpoint must not have moved past the event it left, or the event would never be swept.
    assert checkpoints(ctx.engine).get(tasks.SWEEP_CHECKPOINT, 0) < submitted.position

    ctx.sweep_grace = 0
    read = events_the_sweep_reads(ctx, monkeypatch)
    tasks.sweep(ctx)
    assert read == [e.position for e in young]
    monkeypatch.undo()
    assert [e.type for e in outcomes_of(ctx, submitted.position)] == ["archive_unpacked"]
    assert checkpoints(ctx.engine)[tasks.SWEEP_CHECKPOINT] >= young[-1].position


def test_sweep_leaves_archives_to_queued_checks_and_comes_back_once_the_queue_is_empty(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = append_submission(ctx, "s1", b"queued")
    ctx.waiting = 12  # a burst's check messages still wait for the workers
    read = events_the_sweep_reads(ctx, monkeypatch)
    tasks.sweep(ctx)
    assert read == []  # nothing read while the queue holds checks
    monkeypatch.undo()
    assert outcomes_of(ctx, submitted.position) == []
    assert checkpoints(ctx.engine).get(tasks.SWEEP_CHECKPOINT, 0) < submitted.position
    assert min(checkpoints(ctx.engine).get(name, 0) for name in NAMES) == ctx.store.head()  # reads still catch up

    ctx.waiting = 0  # drained, and this archive's message was not among them: it was lost
    tasks.sweep(ctx)
    assert [e.type for e in outcomes_of(ctx, submitted.position)] == ["archive_unpacked"]


def test_sweeper_timer_finds_work_appended_after_it_started(ctx: Context) -> None:
    sweeper = Sweeper(ctx, interval=0.2)
    sweeper.start()
    try:
        submitted = append_submission(ctx, "s1", b"later")
        until(lambda: outcomes_of(ctx, submitted.position), 15, "the sweeper's timer never checked the archive")
        until(
            lambda: checkpoints(ctx.engine).get("collections", 0) >= ctx.store.head(),
            15,
            "the sweeper never caught the projections up",
        )
    finally:
        sweeper.stop()
    assert len(outcomes_of(ctx, submitted.position)) == 1


def test_a_worker_projector_follows_the_log_without_being_told(ctx: Context) -> None:
    """A worker process's catch-up needs no message: it looks at the log's head on a short timer."""
    projector = Projector(ctx, poll=0.1)
    try:
        append_release(ctx)
        for student_id in ("s1", "s2"):
            submitted = append_submission(ctx, student_id, student_id.encode())
            until(
                lambda at=submitted.position: min(checkpoints(ctx.engine).get(name, 0) for name in NAMES) >= at,
                5,
                "the projector never caught up with the log",
            )
    finally:
        projector.stop()


def test_an_idle_worker_projector_looks_less_often_and_still_follows_within_its_longest_wait(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[float] = []
    real = tasks.catch_up

    def counted(c: Any) -> dict[str, int]:
        looks.append(time.monotonic())
        return real(c)

    monkeypatch.setattr(tasks, "catch_up", counted)
    projector = Projector(ctx, poll=0.1)
    try:
        time.sleep(3.0)
        idle = len(looks)
        # 0.1 s polls would be 30 looks; backing off (0.1, 0.2, 0.4, 0.8, then 1 s) makes about 7.
        assert idle <= 10, looks
        submitted = append_release(ctx)
        appended = time.monotonic()
        until(lambda: min(checkpoints(ctx.engine).get(n, 0) for n in NAMES) >= submitted.position, 5, "never caught up")
        assert time.monotonic() - appended <= FOLLOW_POLL_IDLE + 0.5
        # The log moved: it looks often again.
        time.sleep(0.8)
        assert len([t for t in looks if t > appended]) >= 3, looks  # found it, then 0.1 and 0.2 s later
    finally:
        projector.stop()


@pytest.mark.timeout(120)
def test_a_database_outage_is_logged_once_each_way_by_the_projector_and_the_sweeper(
    own_postgres: PostgresServer, archive_store: ArchiveStore, caplog: pytest.LogCaptureFixture
) -> None:
    """They try ten and twenty times a second here: a line per try would bury the outage's one."""
    engine = make_engine(own_postgres.url)
    upgrade(engine)
    store = SQLEventStore(engine)
    ctx = Context(engine, store, store, archive_store, ArchiveLimits(), sweep_grace=0)
    projector, sweeper = Projector(ctx, poll=0.05), Sweeper(ctx, interval=0.1)
    sweeper.start()
    try:
        own_postgres.stop()
        time.sleep(2)  # some 40 catch-ups and 20 sweeps fail
        own_postgres.start()
        submitted = append_submission(ctx, "s1", b"after the outage")
        until(lambda: outcomes_of(ctx, submitted.position), 15, "the sweeper never came back")
        until(lambda: checkpoints(ctx.engine).get("collections", 0) >= submitted.position, 15, "nor the projector")
    finally:
        sweeper.stop()
        projector.stop()
        engine.dispose()
    lines = [r.getMessage() for r in caplog.records]
    for began, ended in [("Catch-up failed", "Catch-up works again"), ("Sweep failed", "The sweep works again")]:
        failures = [r for r in caplog.records if r.getMessage().startswith(began)]
        assert len(failures) == 1 and failures[0].exc_info is not None, lines
        assert lines.count(ended) == 1, lines


def test_a_failing_check_does_not_stop_the_projections(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error on one archive (the store's disk failing) leaves it for the next sweep; reads catch up."""
    released = append_release(ctx)
    broken = append_submission(ctx, "s1", b"unreadable for now")
    real_open = ctx.archives.open

    def failing_disk(sha256: str) -> Any:
        if sha256 == broken.payload["archive_sha256"]:
            raise OSError(5, "Input/output error")
        return real_open(sha256)

    monkeypatch.setattr(ctx.archives, "open", failing_disk)
    # The sweep's checkpoint stays before the batch holding the failing event,
    # and what the batch decided before the failure is recorded.
    assert tasks.sweep(ctx) < broken.position
    assert [e.type for e in outcomes_of(ctx, released.position)] == ["archive_unpacked"]
    assert dict.fromkeys(NAMES, ctx.store.head()) == {n: checkpoints(ctx.engine)[n] for n in NAMES}
    with ctx.engine.connect() as conn:
        assert [r["archive_state"] for r in list_submissions(conn, 1, COURSE, "ps1")] == ["pending"]

    monkeypatch.setattr(ctx.archives, "open", real_open)  # the disk reads again
    assert tasks.sweep(ctx) >= broken.position
    assert [e.type for e in outcomes_of(ctx, broken.position)] == ["archive_unpacked"]
    assert len(outcomes_of(ctx, released.position)) == 1  # found by its key, not checked again


def test_an_archive_whose_headers_tarfile_cannot_read_is_rejected_not_retried(ctx: Context) -> None:
    """An archive that makes tarfile raise something other than its own errors is decided once, as rejected."""
    append_release(ctx)
    broken = append_submission(ctx, "s1", b"not a number\n", pax_headers=UNREADABLE_PAX["GNU.sparse.map"])
    tasks.sweep(ctx)
    (outcome,) = outcomes_of(ctx, broken.position)
    assert outcome.type == "archive_rejected"
    assert "not a readable gzip'd tar" in outcome.payload["reason"]
    tasks.sweep(ctx)
    assert len(outcomes_of(ctx, broken.position)) == 1


@pytest.mark.parametrize("damage", ["missing", "changed bytes", "truncated", "grown"])
def test_a_blob_the_store_lost_or_changed_is_rejected_with_the_reason(ctx: Context, damage: str) -> None:
    """The check reads the stored bytes once and hashes them as it goes: any damage is an ``archive_rejected``."""
    append_release(ctx)
    broken = append_submission(ctx, "s1", b"my work")
    sha = broken.payload["archive_sha256"]
    with ctx.archives.open(sha) as blob:
        original = blob.read()
    damaged = {
        "missing": None,
        "changed bytes": original[:-9] + bytes([original[-9] ^ 0xFF]) + original[-8:],
        "truncated": original[: len(original) // 2],
        "grown": original + b"\0" * 512,
    }[damage]
    replace_blob(ctx.archives, sha, damaged)

    tasks.sweep(ctx)

    (outcome,) = outcomes_of(ctx, broken.position)
    assert outcome.type == "archive_rejected"
    reason = outcome.payload["reason"]
    if damage == "missing":
        assert f"No archive with sha256 {sha}" in reason
    else:
        # The damaged bytes are no readable gzip'd tar either; the hash tells what happened to them.
        assert reason == f"The stored bytes of archive {sha} no longer hash to its name: the store changed them."
