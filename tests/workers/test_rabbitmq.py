"""On RabbitMQ the exchange's queue is a quorum queue and every message it sends is confirmed by the broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from httpclient import COURSE, course_events, ok, release, until
from kombu import Connection
from service import TEST_BROKER_URL, Service

from nbexchange.workers.app import is_rabbitmq, make_celery

USERS = {"ada": {COURSE: "Instructor"}}
NOBODY = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens: making the app connects to nothing


def test_rabbitmq_urls_are_told_from_the_others() -> None:
    assert is_rabbitmq("amqp://guest:guest@127.0.0.1:5672//")
    assert is_rabbitmq("pyamqp://host/vhost")
    assert is_rabbitmq("amqp://a:5672//;amqp://b:5672//")  # a failover list
    assert not is_rabbitmq("redis://127.0.0.1:6379/0")
    assert not is_rabbitmq("")


@pytest.mark.parametrize(
    "kwargs, queue_arguments, confirms",
    [
        ({}, {"x-queue-type": "quorum"}, True),
        ({"queue_type": "classic"}, None, True),
        ({"confirm_timeout": 0}, {"x-queue-type": "quorum"}, False),
    ],
)
def test_on_rabbitmq_the_queue_is_quorum_and_publishes_are_confirmed(
    kwargs: dict[str, Any], queue_arguments: dict[str, str] | None, confirms: bool
) -> None:
    app = make_celery(None, NOBODY, "nbx-q", **kwargs)  # type: ignore[arg-type]  # no task runs here
    queue = app.amqp.queues["nbx-q"]
    assert queue.queue_arguments == queue_arguments
    assert queue.durable and not queue.exclusive and not queue.auto_delete
    # Celery's native delayed delivery (a retry's wait spent in the broker) needs a topic exchange.
    assert queue.exchange.type == "topic"
    assert app.conf.broker_transport_options == {"confirm_publish": confirms}


def test_redis_keeps_its_own_settings() -> None:
    app = make_celery(None, "redis://127.0.0.1:1/0", "nbx-q")  # type: ignore[arg-type]
    queue = app.amqp.queues["nbx-q"]
    assert queue.queue_arguments is None and queue.exchange.type == "direct"
    assert app.conf.broker_transport_options["visibility_timeout"] == 900


def test_the_service_declares_a_quorum_queue_on_rabbitmq(exchange_service: Callable[..., Service]) -> None:
    if not is_rabbitmq(TEST_BROKER_URL):
        pytest.skip("runs in the RabbitMQ pass")
    svc = exchange_service(USERS)
    ok(release(svc, "ada", "ps1"), 201)
    until(lambda: any(e["type"] == "archive_unpacked" for e in course_events(svc, "ada", assignment_id="ps1")), 30)
    # RabbitMQ refuses to declare an existing queue as another type: the answer names the one it has.
    with Connection(svc.broker_url, connect_timeout=2) as conn, pytest.raises(conn.channel_errors) as refused:
        conn.default_channel.queue_declare(
            svc.queue, durable=True, auto_delete=False, arguments={"x-queue-type": "classic"}
        )
    assert "x-queue-type" in str(refused.value) and "quorum" in str(refused.value), refused.value
