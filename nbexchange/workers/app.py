"""The Celery app, its tasks, the in-process worker thread and the sweeper's timer."""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from celery import Celery
from kombu.connection import Connection as _Connection
from kombu.utils.url import maybe_sanitize_url

from nbexchange.errors import Unavailable
from nbexchange.events.store import RecordedEvent
from nbexchange.periodic import Periodic
from nbexchange.workers import tasks
from nbexchange.workers.tasks import WorkerContext

# kombu's Connection is untyped; it is only asked which transport a URL names.
Connection: Callable[[str], Any] = _Connection

log = logging.getLogger(__name__)

#: The embedded default: kombu's in-process transport, no Redis needed.
EMBEDDED_BROKER = "memory://localhost/"

CHECK_ARCHIVES = "nbexchange.check_archives"
#: The fewest archives per check message: fewer messages in a burst, still spread over workers.
CHECKS_PER_MESSAGE = 8
#: A backlog of held checks (a burst's, once its uploads stop) is split into about this many messages, each
#: of ``CHECKS_PER_MESSAGE`` to ``CHECKS_PER_BUSY_MESSAGE`` archives (fewer messages of 8 for a backlog of
#: 256 or less, more of 64 past 2,048): a few thousand held go in messages of 64, not hundreds of 8, each
#: costing its worker two reads, a commit and a catch-up (a check cost 2.9-3.1 ms of CPU in messages of 8
#: on PostgreSQL, 2.0-2.1 in messages of 64: bench/check_cost.py; end to end, the CPU after a
#: 3,000-student burst fell by a quarter to a third: bench/README.md).
BACKLOG_MESSAGES = 32
#: Archives per check message while the process receives uploads (checks held, see ``Dispatcher``):
#: each message costs its worker two reads, a commit and the outcomes' catch-up, on the CPUs the
#: uploads need. A held check whose time has come waits up to ``BUSY_FILL`` seconds more for its
#: message to fill.
CHECKS_PER_BUSY_MESSAGE = 64
BUSY_FILL = 1.0
#: The longest wait (seconds) before a check the database could not serve is tried again.
CHECK_RETRY_MAX = 5
#: How often (seconds) held check messages look whether they may go.
HOLD_POLL = 0.05
#: While the process receives uploads, catch-up starts at most this often (seconds).
BUSY_CATCH_UP_INTERVAL = 0.2
#: How often (seconds) a worker process's projector looks whether the log moved, while it does.
FOLLOW_POLL = 0.1
#: The longest a worker process's projector waits between looks once the log stands still (seconds):
#: each look that finds nothing new doubles the wait up to this, and one that does returns it to FOLLOW_POLL.
FOLLOW_POLL_IDLE = 1.0
CATCH_UP = "nbexchange.catch_up"
SWEEP = "nbexchange.sweep"

#: The queue the exchange's tasks travel on, unless ``queue_name`` says otherwise.
QUEUE = "nbexchange"
#: Seconds a message sent to RabbitMQ waits for the broker's confirm, unless ``publish_confirm_timeout`` says otherwise.
PUBLISH_CONFIRM_TIMEOUT = 5.0


def shown_url(url: str) -> str:
    """A broker URL as it may be logged: the password of each URL (of a ``;`` failover list too) masked."""
    try:
        return ";".join(maybe_sanitize_url(part) for part in url.split(";"))
    except ValueError:  # kombu cannot parse it: show nothing of it rather than a secret
        return "(a broker URL that cannot be parsed, not shown)"


def is_rabbitmq(broker_url: str) -> bool:
    """Whether ``broker_url`` (or the first URL of a ``;`` failover list) names an AMQP broker: RabbitMQ."""
    return bool(broker_url) and Connection(broker_url.split(";")[0]).transport.driver_type == "amqp"


def make_celery(
    ctx: WorkerContext,
    broker_url: str,
    queue: str = QUEUE,
    *,
    queue_type: str = "quorum",
    confirm_timeout: float = PUBLISH_CONFIRM_TIMEOUT,
    sends_only: bool = False,
) -> Celery:
    """A Celery app whose tasks run against ``ctx``.

    Tasks carry positions, never file contents; they are acknowledged only
    after they ran (``acks_late``), and a task whose worker died is delivered
    again. Nothing waits on results, so none are stored.

    On RabbitMQ (an ``amqp://`` broker) the queue is of ``queue_type``
    (``quorum``: durable, on disk before the broker confirms it), and each
    message is sent with publisher confirms: the send returns once the broker
    has the message, and fails (the sweep then does its work) if the broker
    refuses it or says nothing within ``confirm_timeout`` seconds (0: no
    confirms). In a process that ``sends_only`` (an API process, which
    consumes nothing), every other wait on the broker (a connection's
    handshake, a reply, closing a channel) gives up after ``confirm_timeout``
    seconds too, so that a whole send, with its retries, does.
    """
    app = Celery("nbexchange", broker=broker_url or EMBEDDED_BROKER, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A Redis message not acknowledged within this time goes to another worker.
            "visibility_timeout": 900,
            # The in-process transport polls; its default (1 s) would delay every read-your-write.
            "polling_interval": 0.05,
        },
        task_default_queue=queue,
    )
    if is_rabbitmq(broker_url):
        bounded: dict[str, float] = {}
        if sends_only and confirm_timeout > 0:
            # A send that failed leaves kombu closing its pooled connection, and py-amqp
            # waits for the broker's Channel.Close-Ok, then Connection.Close-Ok, with no
            # time limit (kombu's Producer.__exit__ -> Resource.replace -> Connection._close
            # -> amqp's Channel.close). A broker that took a message it cannot confirm (a
            # quorum queue without a leader) answers only once it gives up on the message,
            # about a minute later, and every check message of the process waits behind
            # it. py-amqp bounds each read and write (SO_RCVTIMEO, SO_SNDTIMEO) and each
            # handshake with these, which kombu passes on from the transport options.
            # Not in a worker process: its consumer reads the same kind of connection for
            # as long as no message comes, and stays as Celery configures it.
            bounded = {
                "read_timeout": confirm_timeout,
                "write_timeout": confirm_timeout,
                "connect_timeout": confirm_timeout,
            }
        app.conf.update(
            task_default_queue_type=queue_type,
            # A quorum queue has no global QoS: Celery then sets each consumer's prefetch instead.
            worker_detect_quorum_queues=True,
            # With quorum queues, a retry's delay is spent in the broker (Celery's native delayed
            # delivery, through topic exchanges), not in a worker's memory holding the message.
            task_default_exchange_type="topic",
            broker_transport_options={"confirm_publish": confirm_timeout > 0, **bounded},
        )

    # With a broker, a check the database could not serve (down, restarting,
    # failing over) goes back to the queue and is tried again, sooner at
    # first, then every few seconds until the database answers (the delays
    # are random up to 1, 2, 4, then CHECK_RETRY_MAX seconds, so a backlog
    # does not come back all at once), however long the outage lasts.
    # Acknowledged as failed, it would wait for the sweep. Every check is
    # idempotent: the positions already done are found done. Embedded, a
    # failed check is still left to the sweep (every sweep_interval): kombu's
    # in-process transport never delivered the message a task republishes to
    # retry itself (seen with kombu 5.7), which would be lost silently.
    retry_on_outage: dict[str, Any] = {}
    if broker_url:
        retry_on_outage = {
            "autoretry_for": (Unavailable,),
            "retry_backoff": 1,
            "retry_backoff_max": CHECK_RETRY_MAX,
            "retry_jitter": True,
            "max_retries": None,
        }

    @app.task(name=CHECK_ARCHIVES, **retry_on_outage)  # type: ignore[untyped-decorator]
    def check_archives(positions: list[int]) -> None:
        tasks.check_archives(ctx, positions)

    @app.task(name=CATCH_UP)  # type: ignore[untyped-decorator]
    def catch_up() -> None:
        tasks.catch_up(ctx)

    @app.task(name=SWEEP)  # type: ignore[untyped-decorator]
    def sweep() -> None:
        tasks.sweep(ctx)

    return app


def described(error: BaseException) -> str:
    """An error in a few words: its message or, where it has none, its type and its cause's.

    py-amqp's ``MessageNacked`` (the broker refused a message), wrapped by
    kombu in an ``OperationalError``, says nothing but its type.
    """
    text = str(error)
    if text:
        return text
    cause = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {described(cause)}" if cause else type(error).__name__


class OutageLog:
    """Logs an outage once when it begins (with its traceback) and once when it ends, however often it is met.

    Each of the dispatcher, the projector and the sweeper meets an outage at
    every try (several a second for the first two): a line per try would
    bury the one that matters.
    """

    def __init__(self, began: str, ended: str, level: int = logging.WARNING) -> None:
        self.began = began
        self.ended = ended
        self.level = level
        self.down = False

    def failed(self, error: BaseException) -> None:
        """A try failed; logged if it is the outage's first."""
        if not self.down:
            log.log(self.level, self.began, described(error), exc_info=error)
        self.down = True

    def worked(self) -> None:
        """A try worked; logged if it ends an outage."""
        if self.down:
            log.warning(self.ended)
        self.down = False


class Dispatcher:
    """Sends wake-ups for committed events, from its own thread.

    The committer hands over events and moves on; a slow or absent broker
    delays the workers (the sweep catches up) but never the accept path.

    Archive events get ``check_archives`` messages. Catch-up needs none: a
    worker process's :class:`Projector` follows the log on its own, and in
    the embedded default ``catch_up`` wakes the process's projector after
    each commit. ``hold_checks`` says whether the process is receiving
    uploads, which go first where the workers share its CPUs (the embedded
    default always; with a broker if ``check_defer_max`` says so). While it
    says yes, each check waits, at most ``hold_max`` seconds from its event's
    commit (and up to ``BUSY_FILL`` more, to go in a message of
    ``CHECKS_PER_BUSY_MESSAGE``), and ``catch_up`` is called at most every
    ``catch_up_interval`` seconds: a burst's commits are applied a few dozen
    at a time, not with a pass (a transaction, the checkpoints' reads) each.
    A held message lost with the process is a lost message like any other:
    the sweep does its work. So is one the broker refuses, or (on RabbitMQ,
    with publisher confirms) does not confirm within ``confirm_timeout``
    seconds.
    """

    def __init__(
        self,
        app: Celery,
        *,
        hold_checks: Callable[[], bool] | None = None,
        hold_max: float = 20.0,
        catch_up: Callable[[], None] | None = None,
        catch_up_interval: float = BUSY_CATCH_UP_INTERVAL,
        confirm_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.confirm_timeout = confirm_timeout
        self.hold_checks = hold_checks
        self.hold_max = hold_max
        self.catch_up = catch_up
        self.catch_up_interval = catch_up_interval
        self._outage = OutageLog(
            "Could not send to the broker (%s); until it takes messages again, the sweep picks up what is committed",
            "The broker takes messages again",
        )
        self._queue: queue.Queue[Sequence[RecordedEvent] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nbexchange-dispatcher", daemon=True)
        self._thread.start()

    def __call__(self, events: Sequence[RecordedEvent]) -> None:
        """Queue wake-ups for these freshly committed events."""
        self._queue.put(events)

    def close(self) -> None:
        """Send what is queued or held, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _send(self, name: str, args: tuple[Any, ...] = ()) -> None:
        self.app.send_task(
            name,
            args=args,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5},
            confirm_timeout=self.confirm_timeout,
        )

    def _due(
        self, held: list[tuple[int, float]], busy: bool, now: float
    ) -> tuple[list[list[int]], list[tuple[int, float]]]:
        """The check messages to send now (positions each), and the held checks that keep waiting.

        ``held`` is in commit order, so also in the order of when each began to wait: the due ones are a
        prefix, found by bisection. A pass costs no more with thousands held than with a few (a burst
        holds ~20 s of submissions, and the dispatcher passes every ``HOLD_POLL`` and after each commit).
        """
        if not busy:
            return in_messages([position for position, _ in held], backlog_message_size(len(held))), []
        oldest = now - self.hold_max
        count = bisect.bisect_right(held, oldest, key=itemgetter(1))
        if count and held[0][1] > oldest - BUSY_FILL:
            count -= count % CHECKS_PER_BUSY_MESSAGE  # the last message is not full yet
        if not count:
            return [], held
        return in_messages([position for position, _ in held[:count]], CHECKS_PER_BUSY_MESSAGE), held[count:]

    def _run(self) -> None:
        held: list[tuple[int, float]] = []  # archive events whose check message waits, since when
        caught_up_at = -math.inf
        catch_up_due = closing = False
        while not closing:
            try:
                events = self._queue.get(timeout=HOLD_POLL if held or catch_up_due else None)
            except queue.Empty:
                events = ()
            # Gather whatever else is waiting, so a burst costs one pass.
            batch = list(events or ())
            closing = events is None
            while not closing:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                closing = more is None
                batch.extend(more or ())
            now = time.monotonic()
            busy = not closing and self.hold_checks is not None and self.hold_checks()
            held += [(event.position, now) for event in batch if event.data.archive() is not None]
            messages, held = self._due(held, busy, now)
            wake = self.catch_up
            if wake is not None:
                catch_up_due = catch_up_due or bool(batch)
                if catch_up_due and (not busy or now - caught_up_at >= self.catch_up_interval):
                    catch_up_due, caught_up_at = False, now
                    wake()
            try:
                for positions in messages:
                    self._send(CHECK_ARCHIVES, (positions,))
            except Exception as e:
                # Once per outage, not per commit batch; the sweep does the work meanwhile.
                self._outage.failed(e)
            else:
                self._outage.worked()


def backlog_message_size(held: int) -> int:
    """Archives per message for ``held`` checks sent at once: a ``BACKLOG_MESSAGES``th, within the messages' bounds."""
    return max(CHECKS_PER_MESSAGE, min(CHECKS_PER_BUSY_MESSAGE, -(-held // BACKLOG_MESSAGES)))


def in_messages(positions: list[int], size: int) -> list[list[int]]:
    """The positions in messages of ``size``, in order."""
    return [positions[start : start + size] for start in range(0, len(positions), size)]


class Projector:
    """A thread that brings the projections up to the head of the log.

    In the embedded default the dispatcher wakes it after each commit. In a
    worker process it follows the log on its own, every ``poll`` seconds (a
    look at the head and the checkpoints; a write transaction only when the
    log moved), so catch-up never waits in the queue behind archive checks.
    Once the log stands still it looks less and less often, up to every
    ``FOLLOW_POLL_IDLE`` seconds (an idle worker costs the database almost
    nothing); its own process's commits still wake it at once.
    """

    def __init__(self, ctx: WorkerContext, poll: float | None = None) -> None:
        self.ctx = ctx
        self.poll = poll
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nbexchange-projector", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Catch up soon (wake-ups that come while it works make one more pass, not many)."""
        self._wake.set()

    def stop(self) -> None:
        """Make a last pass over what was committed, then stop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        outage = OutageLog(
            "Catch-up failed (%s); it is tried again at each wake-up until it works",
            "Catch-up works again",
            logging.ERROR,
        )
        wait = self.poll
        seen: dict[str, int] | None = None
        while True:
            woken = self._wake.wait(wait)
            self._wake.clear()
            try:
                marks = tasks.catch_up(self.ctx)
            except Exception as e:
                outage.failed(e)
            else:
                outage.worked()
                if self.poll is not None:
                    moved = woken or marks != seen
                    wait = self.poll if moved else min(2 * (wait or self.poll), max(self.poll, FOLLOW_POLL_IDLE))
                seen = marks
            if self._stopping:
                return


class Sweeper(Periodic):
    """A timer thread: sweep and catch up on start, then every ``interval`` seconds.

    It calls the task functions directly, not through the broker, so that a
    restarted Redis or a lost message can only ever delay work.
    """

    def __init__(self, ctx: WorkerContext, interval: float) -> None:
        outage = OutageLog(
            f"Sweep failed (%s); it is tried again every {interval} s until it works",
            "The sweep works again",
            logging.ERROR,
        )
        super().__init__("nbexchange-sweeper", interval, outage)
        self.ctx = ctx

    def tick(self) -> None:
        tasks.sweep(self.ctx)


class EmbeddedWorker:
    """A Celery worker running in a thread of this process (the embedded default)."""

    def __init__(self, app: Celery, concurrency: int = 2) -> None:
        queue = app.conf.task_default_queue
        from celery.worker import WorkController

        self._ready = threading.Event()
        self.worker = WorkController(
            app=app,
            pool="threads",
            concurrency=concurrency,
            hostname=f"nbexchange-embedded-{id(self)}@localhost",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=lambda *args: self._ready.set(),
            queues=[queue],
            loglevel="WARNING",
        )
        self._thread = threading.Thread(target=self.worker.start, name="nbexchange-worker", daemon=True)

    def start(self, timeout: float = 30) -> None:
        """Start the worker thread and wait until it consumes."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("The embedded Celery worker did not start.")

    def stop(self) -> None:
        """Stop consuming and let running tasks finish."""
        self.worker.stop(in_sighandler=False, exitcode=0)
        self._thread.join(timeout=30)
