"""The ``nbexchange`` command: every setting, and the service, worker and audit commands."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Float, Int, TraitError, Type, Unicode, default, validate
from traitlets.config import Application

from nbexchange.errors import Invalid
from nbexchange.identity import JupyterHubPlugin, UserPlugin, UsersFilePlugin, create_demo_users_file

#: A worker process restarts its Celery consumer after an error at most this often per minute.
MAX_WORKER_RESTARTS = 5

COMMANDS = {
    "serve": "Run the HTTP API (the default). With no broker_url, also runs the workers in-process.",
    "worker": "Run a Celery worker process on broker_url: unpack and check archives, build projections.",
    "upgrade-db": "Create or upgrade the database schema, then exit.",
    "verify": "Recompute the log's hash chain and every stored archive's sha256; exit 1 on any fault. With "
    "--expect-head or --anchors, also check the log still holds heads recorded elsewhere.",
    "export": "Write the whole log as JSON lines (hashes included) to stdout or --output.",
    "replay": "Print the exchange as it stood at --until-position or --until-time (JSON).",
    "report": "One assignment's record per student (on time, late, missing; resubmissions, collections, feedback, "
    "clock skew) as a table, CSV or an HTML page with a plot: --course, --assignment.",
    "extract": "Write one submission's archive (--submission POSITION) to --output and print its sha256, appending "
    "nothing.",
    "rebuild": "Rebuild every projection from position 0 (refuses a database with no log).",
    "collect": "Remove stored blobs no event owns and crashes' leftovers, older than blob_grace (or --grace).",
}


#: The options each command reads (besides every setting); ``nbexchange COMMAND --help`` lists them.
COMMAND_OPTIONS = {
    "serve": ("ip", "port", "config", "log-level"),
    "worker": ("config", "log-level"),
    "upgrade-db": ("config", "log-level"),
    "verify": ("until-position", "expect-head", "anchors", "projections", "config", "log-level"),
    "export": ("output", "config", "log-level"),
    "replay": ("until-position", "until-time", "course", "assignment", "org", "config", "log-level"),
    "report": (
        "course",
        "assignment",
        "org",
        "deadline",
        "as-of",
        "format",
        "output",
        "max-clock-skew",
        "config",
        "log-level",
    ),
    "extract": ("submission", "output", "config", "log-level"),
    "rebuild": ("config", "log-level"),
    "collect": ("grace", "config", "log-level"),
}

#: The commands that only read: they open the database read-only and never write the store.
AUDIT_COMMANDS = ("verify", "export", "replay", "report", "extract")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nbexchange")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _utf8_stdout() -> Any:
    """stdout, writing UTF-8 whatever the locale (the log's text is UTF-8)."""
    sys.stdout.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
    return sys.stdout


def _url_prefix(value: str) -> str:
    """``value`` as a URL prefix: one leading and one trailing slash, no doubled ones."""
    return re.sub("/+", "/", "/" + value + "/")


class NbExchange(Application):  # type: ignore[misc, unused-ignore]
    """The nbexchange service: one settings object for API processes and workers."""

    name = "nbexchange"
    version = _version()
    # Listed so that ``--help-all`` and ``--JupyterHubPlugin.x=…`` know the identity plugins' settings.
    classes = [JupyterHubPlugin, UsersFilePlugin]
    description = "A JupyterHub service that replaces nbgrader's filesystem exchange.\n\nCommands:\n" + "\n".join(
        f"  {name:<11} {text}" for name, text in COMMANDS.items()
    )
    examples = """
nbexchange                                   # embedded default on 127.0.0.1:9000
nbexchange --NbExchange.broker_url=redis://127.0.0.1:6379/0 --port=9001
nbexchange worker --NbExchange.broker_url=redis://127.0.0.1:6379/0
nbexchange verify
nbexchange replay --until-time="2026-01-31 23:59:59 UTC" --course=phys101 --assignment=ps1
"""

    aliases = {
        "port": "NbExchange.port",
        "ip": "NbExchange.ip",
        "config": "NbExchange.config_file",
        "log-level": "NbExchange.log_level",
        "output": "NbExchange.output",
        "until-position": "NbExchange.until_position",
        "until-time": "NbExchange.until_time",
        "course": "NbExchange.course_id",
        "assignment": "NbExchange.assignment_id",
        "org": "NbExchange.org_id",
        "grace": "NbExchange.blob_grace",
        "expect-head": "NbExchange.expect_head",
        "anchors": "NbExchange.anchors",
        "deadline": "NbExchange.deadline",
        "as-of": "NbExchange.as_of",
        "format": "NbExchange.report_format",
        "max-clock-skew": "NbExchange.max_clock_skew",
        "submission": "NbExchange.submission",
    }
    flags = {
        **Application.flags,
        "projections": (
            {"NbExchange": {"verify_projections": True}},
            "verify: also compare the live read models with ones rebuilt from the log.",
        ),
    }

    # -- where it listens --------------------------------------------------

    ip = Unicode("127.0.0.1", config=True, help="The address the API listens on.")
    port = Int(9000, config=True, help="The port the API listens on.")
    reuse_port = Bool(
        False, config=True, help="Let several API processes listen on the same port (SO_REUSEPORT) to share load."
    )
    base_url = Unicode(config=True, help="The URL prefix of every route (env JUPYTERHUB_SERVICE_PREFIX).")

    @default("base_url")
    def _default_base_url(self) -> str:
        # traitlets does not validate dynamic defaults, so the environment's value is normalised here.
        return _url_prefix(os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/nbexchange/"))

    @validate("base_url")
    def _slashes(self, proposal: dict[str, Any]) -> str:
        return _url_prefix(str(proposal["value"]))

    # -- where it keeps things ---------------------------------------------

    base_storage_location = Unicode(
        config=True, help="Folder for uploaded archives and, by default, the database (env NBEX_BASE_STORE)."
    )

    @default("base_storage_location")
    def _default_store(self) -> str:
        return os.environ.get("NBEX_BASE_STORE", "/tmp/courses")

    blob_store = Enum(
        ["local", "s3"],
        config=True,
        help="Where archives are kept: 'local', in base_storage_location/archives (shared by every process), or "
        "'s3', in an S3-compatible object store (s3_bucket, s3_endpoint_url...; credentials from the AWS SDK's "
        "usual chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, a role). Env NBEX_BLOB_STORE.",
    )

    @default("blob_store")
    def _default_blob_store(self) -> str:
        return os.environ.get("NBEX_BLOB_STORE", "local")

    s3_bucket = Unicode(config=True, help="The bucket of the S3 store (blob_store 's3'; env NBEX_S3_BUCKET).")

    @default("s3_bucket")
    def _default_s3_bucket(self) -> str:
        return os.environ.get("NBEX_S3_BUCKET", "")

    s3_prefix = Unicode(
        config=True,
        help="Key prefix of everything the S3 store writes in its bucket, e.g. 'nbexchange/' (env NBEX_S3_PREFIX).",
    )

    @default("s3_prefix")
    def _default_s3_prefix(self) -> str:
        return os.environ.get("NBEX_S3_PREFIX", "")

    s3_endpoint_url = Unicode(
        config=True,
        help="URL of an S3-compatible server (MinIO, Ceph, Garage...), e.g. http://minio:9000; empty: AWS S3 "
        "(env NBEX_S3_ENDPOINT_URL).",
    )

    @default("s3_endpoint_url")
    def _default_s3_endpoint_url(self) -> str:
        return os.environ.get("NBEX_S3_ENDPOINT_URL", "")

    s3_region = Unicode(
        "", config=True, help="Region of the S3 store; empty: the AWS SDK's own (AWS_DEFAULT_REGION, a profile)."
    )
    s3_addressing_style = Enum(
        ["auto", "path", "virtual"],
        "auto",
        config=True,
        help="How the bucket is named in requests: 'path' (http://host/bucket/key) suits most self-hosted "
        "S3-compatible servers; 'virtual' (http://bucket.host/key); 'auto' lets the AWS SDK choose.",
    )
    s3_create_bucket = Bool(
        False, config=True, help="Create s3_bucket on start if it does not exist (a test or single-host setup)."
    )

    db_url = Unicode(
        config=True,
        help="SQLAlchemy URL of the database (env NBEX_DB_URL). Default: a SQLite file in "
        "base_storage_location. 'sqlite:///:memory:' is accepted but loses everything at exit.",
    )

    @default("db_url")
    def _default_db_url(self) -> str:
        return os.environ.get("NBEX_DB_URL") or f"sqlite:///{Path(self.base_storage_location) / 'nbexchange.sqlite'}"

    upgrade_db = Bool(True, config=True, help="Create or upgrade the database schema on start.")

    # -- the queue -----------------------------------------------------------

    broker_url = Unicode(
        config=True,
        help="Celery broker URL (env NBEX_BROKER_URL): Redis, e.g. redis://host:6379/0, or RabbitMQ, e.g. "
        "amqp://user:password@host:5672/vhost. Empty: the embedded in-process broker, with a worker thread "
        "inside the API process.",
    )

    @default("broker_url")
    def _default_broker_url(self) -> str:
        return os.environ.get("NBEX_BROKER_URL", "")

    queue_name = Unicode(
        "nbexchange",
        config=True,
        help="The Celery queue of this exchange (several exchanges can share one Redis or RabbitMQ vhost).",
    )
    queue_type = Enum(
        ["quorum", "classic"],
        "quorum",
        config=True,
        help="RabbitMQ only: the type of the queue. quorum: replicated across the cluster's nodes and on disk "
        "before the broker confirms a message; classic: one node's queue. RabbitMQ refuses to declare an "
        "existing queue as another type: change queue_name (or delete the queue) when changing it.",
    )
    publish_confirm_timeout = Float(
        5.0,
        config=True,
        help="RabbitMQ only: seconds a message sent to the workers waits for the broker's confirm that it has it "
        "(publisher confirms). A message refused or not confirmed in time counts as not sent: the sweep does its "
        "work. In an API process, also the longest wait for any answer of the broker (a connection's handshake, "
        "a reply, a channel's close). 0: send without confirms.",
    )
    db_dead_client_timeout = Float(
        15.0,
        config=True,
        help="PostgreSQL: seconds after which the server ends the session of a process whose host it can no "
        "longer reach (cut off, powered off), releasing its locks; without it a host lost mid-append holds the "
        "log's lock, and every other host's writes wait, until TCP gives up (hours by default). Set as the "
        "session's TCP keepalive and user timeout; a live client, however slow, is never cut. 0: the server's "
        "own settings.",
    )
    worker_concurrency = Int(2, config=True, help="Tasks a worker (thread or process) runs at once.")
    sweep_interval = Float(
        15.0, config=True, help="Seconds between a worker's sweeps of the log (catch-up after a lost message)."
    )
    sweep_grace = Float(
        30.0, config=True, help="Seconds an archive's own check message has before the sweep checks it instead."
    )
    check_defer_max = Float(
        None,
        allow_none=True,
        config=True,
        help="Seconds an archive check may wait while its API process receives uploads, so they go first; 0: "
        "never. Default: 20 in the embedded default, 0 with a broker (set it where workers share the API "
        "processes' CPUs). Keep it at least 1 s (a held check's wait to fill its message) below sweep_grace.",
    )
    blob_grace = Float(
        3600.0,
        config=True,
        help="Seconds a stored blob that no event owns (a purged release, an upload whose request was refused) "
        "and a crash's leftover (a partial upload, a half-unpacked folder) are kept before the collector removes "
        "them. Must exceed the longest time from an upload being stored to its event's commit.",
    )
    collect_interval = Float(
        600.0,
        config=True,
        help="Seconds between a worker's runs of the blob collector; 0: never (run `nbexchange collect`).",
    )
    group_commit_max = Int(256, config=True, help="Most appends committed together in one transaction.")

    # -- who is calling ------------------------------------------------------

    users_file = Unicode(config=True, help="YAML or JSON file of users and tokens (env NBEX_USERS_FILE).")

    @default("users_file")
    def _default_users_file(self) -> str:
        return os.environ.get("NBEX_USERS_FILE", "")

    user_plugin_class = Type(
        klass=UserPlugin,
        config=True,
        help="Turns a request into a user. Default: the JupyterHub plugin when JUPYTERHUB_API_TOKEN is set, "
        "else the users file.",
    )

    @default("user_plugin_class")
    def _default_user_plugin(self) -> type[UserPlugin]:
        if os.environ.get("JUPYTERHUB_API_TOKEN") and not self.users_file:
            return JupyterHubPlugin
        return UsersFilePlugin

    # -- limits --------------------------------------------------------------

    max_upload_size = Int(
        5 * 1024**3, config=True, help="Largest upload accepted, in bytes; larger ones get 413 before being read."
    )
    max_feedback_size = Int(
        50 * 1024**2,
        config=True,
        help="Largest feedback file accepted, in bytes; larger ones get 413 before being read. Feedback is sent "
        "back base64-encoded in JSON, a third larger.",
    )
    max_body_size = Int(
        16 * 1024,
        config=True,
        help="Largest body of any other request (every route and method but an upload), in bytes; larger ones "
        "get 413 before being read.",
    )
    max_header_size = Int(
        64 * 1024, config=True, help="Largest request line and headers, in bytes; larger ones get 431."
    )
    idle_connection_timeout = Float(
        60.0,
        config=True,
        help="Seconds a connection may take to send a request's whole header (or stay idle between requests) "
        "before it is closed.",
    )
    body_timeout = Float(
        60.0, config=True, help="Seconds a request that is not an upload may take to send its body before it is closed."
    )
    upload_timeout = Float(
        3600.0, config=True, help="Seconds an upload may take to send its whole body before the connection is closed."
    )
    upload_stall_timeout = Float(
        60.0,
        config=True,
        help="Seconds an upload's body may send nothing before it gets 408 and its connection is closed (its "
        "upload discarded); upload_timeout bounds the whole body.",
    )
    max_uploads_per_user = Int(
        4,
        config=True,
        help="Most uploads one user may have in progress at once in each API process; more get 429 with "
        "Retry-After, before their body is read.",
    )
    max_uploads_total = Int(
        256,
        config=True,
        help="Most uploads an API process receives at once; more get 503 with Retry-After, before their body is read.",
    )
    archive_max_members = Int(10_000, config=True, help="Most files and folders an archive may hold.")
    archive_max_total_size = Int(5 * 1024**3, config=True, help="Most bytes an archive may unpack to.")
    archive_max_ratio = Float(200.0, config=True, help="Highest unpacked-to-compressed size ratio (zip bombs).")
    consistency_timeout = Float(
        10.0, config=True, help="Seconds a read with min_position waits for projections before a 503."
    )
    max_clock_skew = Float(
        300.0,
        config=True,
        help="Seconds a submission's own timestamp (the client's clock, which nbgrader computes lateness from) "
        "may differ from the exchange's time; beyond it the submission is refused with 400. The server's commit "
        "time is recorded beside it.",
    )
    executor_threads = Int(64, config=True, help="Threads for blocking work (database, fsync) in an API process.")
    metrics_require_auth = Bool(
        False, config=True, help="Whether /metrics and /head (which publish the log's head) need an authenticated user."
    )

    # -- anchors: the log's head kept outside the exchange ------------------

    anchor_interval = Float(
        0.0,
        config=True,
        help="Seconds between appends of the log's head (position, hash, time) to anchor_file and/or anchor_url, "
        "when it moved; 0: never. `nbexchange verify --anchors=FILE` checks the log against them.",
    )
    anchor_file = Unicode(
        "", config=True, help="File the service appends anchors to, one JSON line each (keep it append-only)."
    )
    anchor_url = Unicode("", config=True, help="URL each anchor is POSTed to as JSON (a write-once store you trust).")

    # -- the audit commands --------------------------------------------------

    output = Unicode(
        "", config=True, help="export, report: file to write (default stdout); extract: the file to write."
    )
    until_position = Int(0, config=True, help="replay, verify: the last position to include (0: the head).")
    until_time = Unicode("", config=True, help="replay: the last moment to include (nbgrader or ISO format).")
    expect_head = Unicode(
        "",
        config=True,
        help="verify: POSITION:HASH, a head recorded elsewhere; fail unless the log's event at POSITION has HASH.",
    )
    anchors = Unicode(
        "",
        config=True,
        help="verify: a file of recorded heads (JSON lines with position and hash, as the service's anchor_file "
        "holds); fail unless the log holds every one.",
    )
    verify_projections = Bool(
        False, config=True, help="verify: compare the live read models with ones rebuilt from the log."
    )

    @validate("until_position", "submission")
    def _not_negative(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 0:
            option = proposal["trait"].name.replace("_", "-")
            raise TraitError(f"--{option} must be a position (1, 2, …), not {proposal['value']}")
        return int(proposal["value"])

    @validate("until_time", "deadline", "as_of")
    def _a_moment(self, proposal: dict[str, Any]) -> str:
        from nbexchange.clock import parse_timestamp

        if proposal["value"]:
            try:
                parse_timestamp(proposal["value"])
            except ValueError:
                option = {"until_time": "until-time", "as_of": "as-of"}.get(proposal["trait"].name, "deadline")
                raise TraitError(
                    f"--{option} {proposal['value']!r} is not a time (nbgrader's '2026-01-31 23:59:59 UTC' or ISO 8601)"
                ) from None
        return str(proposal["value"])

    @validate("expect_head")
    def _a_head(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] and not re.fullmatch(r"[1-9][0-9]*:[0-9a-f]{64}", proposal["value"]):
            raise TraitError(
                f"--expect-head must be POSITION:HASH (a position and 64 hex digits), not {proposal['value']!r}"
            )
        return str(proposal["value"])

    course_id = Unicode("", config=True, help="replay, report: the course to show.")
    assignment_id = Unicode("", config=True, help="replay: the assignment to show (default: all); report: the one.")
    org_id = Int(1, config=True, help="replay, report: the organisation (org_id) whose courses to show.")
    deadline = Unicode(
        "",
        config=True,
        help="report: judge lateness against this due date instead of the log's (students' extensions still apply).",
    )
    as_of = Unicode("", config=True, help="report: the log as it stood at this moment (default: now).")
    report_format = Enum(["table", "csv", "html"], "table", config=True, help="report: table, csv or html.")
    submission = Int(0, config=True, help="extract: the log position of the submission whose archive to write.")

    config_file = Unicode(
        "", config=True, help="Config file to load (default nbexchange_config.py in ./ or /etc/nbexchange/)."
    )

    # -- running -------------------------------------------------------------

    def initialize(self, argv: list[str] | None = None) -> None:
        """Parse the command line, then load the config file (the command line wins).

        A command line that makes no sense exits 2 with a one-line error.
        """
        args = sys.argv[1:] if argv is None else list(argv)
        command = next((a for a in args if not a.startswith("-")), None)
        if command in COMMANDS and ("--help" in args or "-h" in args):
            self.print_command_help(command)
            self.exit(0)
        try:
            super().initialize(argv)  # traitlets reports a bad option and exits 1
        except SystemExit as e:
            if e.code == 1:
                self.exit(2)
            raise
        if self.config_file:
            path = Path(self.config_file)
            if not path.is_file():
                self.log.critical("The config file %s does not exist.", path)
                self.exit(1)
            self.load_config_file(path.name, path=[str(path.parent)])
        else:
            for folder in (os.getcwd(), "/etc/nbexchange"):
                if (Path(folder) / "nbexchange_config.py").is_file():
                    self.load_config_file("nbexchange_config.py", path=[folder])
                    break
        if self.cli_config:
            self.update_config(self.cli_config)
        self.command = self.extra_args[0] if self.extra_args else "serve"
        if self.command not in COMMANDS:
            self.log.critical("Unknown command %r; commands: %s", self.command, ", ".join(COMMANDS))
            self.exit(2)
        if len(self.extra_args) > 1:
            self.log.critical("Unexpected arguments after %r: %s", self.command, " ".join(self.extra_args[1:]))
            self.exit(2)

    def print_command_help(self, command: str) -> None:
        """What ``command`` does and the options it reads."""
        print(f"nbexchange {command}: {COMMANDS[command]}\n\nOptions:")
        for name in COMMAND_OPTIONS[command]:
            if name in self.flags:
                print(f"  --{name}\n      {self.flags[name][1]}")
                continue
            owner, trait_name = self.aliases[name].split(".")
            cls = type(self) if owner == "NbExchange" else Application
            trait = cls.class_traits()[trait_name]
            print(f"  --{name}=<{type(trait).__name__}>  (default {getattr(self, trait_name)!r})\n      {trait.help}")
        print("\nEvery setting (database, store, …): nbexchange --help-all")

    @default("raise_config_file_errors")
    def _default_raise_config_file_errors(self) -> bool:
        # A broken config file must stop the service, not let it run on defaults
        # (e.g. a fresh SQLite file instead of the configured PostgreSQL).
        return True

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @property
    def log_level_number(self) -> int:
        """``log_level`` as a number (traitlets' validator turns a level's name into its number)."""
        level = self.log_level
        return level if isinstance(level, int) else int(logging.getLevelName(str(level).upper()))

    @classmethod
    def class_get_trait_help(cls, trait: Any, inst: Any = None, helptext: str | None = None) -> str:
        """A setting's help; a default computed at start-up (from the environment, from another setting)
        is shown as computed now, where traitlets would show an empty one."""
        text: str = super().class_get_trait_help(trait, inst, helptext)
        if inst is not None or trait.name not in cls._trait_default_generators:
            return text
        value = getattr(cls(), trait.name)
        if trait.name == "log_level":
            value = logging.getLevelName(value)
        elif isinstance(value, type):
            value = f"{value.__module__}.{value.__qualname__}"
        lines = [line for line in text.splitlines() if not line.startswith("    Default: ")]
        return "\n".join([*lines, f"    Default: {value!r}"])

    def _classes_with_config_traits(self, classes: Any = None) -> Any:
        """Every class with settings but traitlets' ``Application``: its settings are listed under ours,
        where their defaults are the ones this command uses."""
        for cls in super()._classes_with_config_traits(classes):
            if cls is not Application:
                yield cls

    @property
    def embedded(self) -> bool:
        """Whether this process also runs the workers (no broker configured)."""
        return not self.broker_url

    @property
    def check_hold_seconds(self) -> float:
        """``check_defer_max``, or its default for this topology."""
        if self.check_defer_max is not None:
            return float(self.check_defer_max)
        return 20.0 if self.embedded else 0.0

    def make_user_plugin(self) -> UserPlugin:
        """The identity plugin; the embedded default on loopback gets a demo users file.

        A plugin that cannot be made (a malformed or exposed users file, say) stops the
        process with one critical line: no traceback, whose causes could quote a secret.
        """
        try:
            return self._make_user_plugin()
        except Invalid as e:
            self.log.critical("%s", e.note)
            self.exit(1)
            raise  # unreachable: exit raises SystemExit

    def _make_user_plugin(self) -> UserPlugin:
        if self.user_plugin_class is UsersFilePlugin and not self.users_file:
            if self.ip not in ("127.0.0.1", "localhost", "::1"):
                self.log.critical(
                    "No identity is configured. Set users_file (NBEX_USERS_FILE) or run under JupyterHub; "
                    "a demo users file is only made for a service listening on 127.0.0.1."
                )
                self.exit(1)
            path = create_demo_users_file(Path(self.base_storage_location) / "demo-users.yaml")
            self.users_file = str(path)
            self.log.warning("No identity configured: demo users (course demo101) and their tokens are in %s", path)
        if issubclass(self.user_plugin_class, UsersFilePlugin):
            return self.user_plugin_class(parent=self, users_file=self.users_file)
        plugin: UserPlugin = self.user_plugin_class(parent=self)
        return plugin

    def start(self) -> None:
        """Run the chosen command."""
        logging.basicConfig(level=self.log_level_number, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
        getattr(self, "cmd_" + self.command.replace("-", "_"))()

    def cmd_serve(self) -> None:
        from nbexchange.api.server import serve

        serve(self)

    def cmd_worker(self) -> None:
        from nbexchange.runtime import Runtime
        from nbexchange.tuning import tune_gc
        from nbexchange.workers.app import Sweeper

        if self.embedded:
            self.log.critical("`nbexchange worker` needs broker_url (NBEX_BROKER_URL); the embedded API runs its own.")
            self.exit(2)
        runtime = Runtime(self, follow_log=True)
        tune_gc()
        sweeper = Sweeper(runtime, self.sweep_interval)
        sweeper.start()
        crashes: list[float] = []
        try:
            while True:
                worker = runtime.celery.Worker(
                    pool="threads",
                    concurrency=self.worker_concurrency,
                    queues=[self.queue_name],
                    loglevel=logging.getLevelName(self.log_level_number),
                    without_mingle=True,
                    without_gossip=True,
                )
                worker.start()
                if not worker.exitcode:
                    break  # asked to stop
                # Celery gives up on errors it calls unrecoverable, and kombu has some
                # when the broker vanishes while messages are unacknowledged. This
                # process's projector and sweeper still run: start the consumer again.
                now = time.monotonic()
                crashes = [t for t in crashes if t > now - 60] + [now]
                if len(crashes) > MAX_WORKER_RESTARTS:
                    self.log.critical("The Celery worker failed %d times within a minute; exiting", len(crashes))
                    break
                self.log.error("The Celery worker stopped on an error (exit %s); starting it again", worker.exitcode)
        finally:
            sweeper.stop()
            runtime.close()
        sys.exit(worker.exitcode or 0)

    def _open(self, audit: bool = False, existing: bool = False) -> Any:
        """The database and its log.

        An audit (``audit``) opens it read-only, never creating or migrating
        it; ``existing`` refuses a database without a log instead of creating one.
        """
        import sqlalchemy as sa

        from nbexchange.audit import open_read_only
        from nbexchange.db import make_engine, upgrade
        from nbexchange.events.sql import SQLEventStore

        url = sa.make_url(self.db_url)
        if not self._db_url_set():
            # An auditor who forgot the setting must not take the default's answer for the exchange's.
            self.log.info("No db_url set: using %s", url.render_as_string(hide_password=True))
        must_exist = audit or existing
        if must_exist and url.get_backend_name() == "sqlite" and not Path(url.database or ":memory:").is_file():
            self._no_log(url)  # connecting would create an empty file
        engine = open_read_only(self.db_url) if audit else make_engine(self.db_url, self.db_dead_client_timeout)
        if must_exist and not sa.inspect(engine).has_table("events"):
            self._no_log(url)
        if not audit and self.upgrade_db:
            upgrade(engine)
        return engine, SQLEventStore(engine)

    def _db_url_set(self) -> bool:
        return "db_url" in self.config.get("NbExchange", {}) or bool(os.environ.get("NBEX_DB_URL"))

    def _no_log(self, url: Any) -> None:
        # Else a mistyped db_url would be "verified" as an empty, intact log.
        where = url.render_as_string(hide_password=True)
        self.log.critical("There is no nbexchange log (no events table) in the database %s.", where)
        self.exit(1)

    def cmd_upgrade_db(self) -> None:
        from nbexchange.db import current_revision

        engine, _ = self._open()
        self.log.info("Database at revision %s", current_revision(engine))

    def cmd_verify(self) -> None:
        from nbexchange.audit import Head, read_anchors, verify, verify_projections
        from nbexchange.storage import open_archive_store

        heads = [Head.parse(self.expect_head)] if self.expect_head else []
        if self.anchors:
            try:
                heads += read_anchors(Path(self.anchors))
            except (OSError, ValueError) as e:
                self.log.critical("Cannot read the anchors: %s", e)
                self.exit(2)
        engine, store = self._open(audit=True)
        until = self.until_position or None
        report = verify(store, open_archive_store(self, create=False), until_position=until, heads=heads)
        if self.verify_projections:
            report["projections"] = verify_projections(engine)
            report["ok"] = report["ok"] and report["projections"]["ok"]
        print(json.dumps(report, indent=2))
        sys.exit(0 if report["ok"] else 1)

    def cmd_export(self) -> None:
        from nbexchange.audit import export

        _, store = self._open(audit=True)
        if self.output:
            with open(self.output, "w", encoding="utf-8") as out:
                count = export(store, out)
            self.log.info("Wrote %d events to %s", count, self.output)
        else:
            export(store, _utf8_stdout())

    def cmd_replay(self) -> None:
        from nbexchange.audit import write_replay

        engine, _ = self._open(audit=True)
        write_replay(
            engine,
            _utf8_stdout(),
            until_position=self.until_position or None,
            until_time=self.until_time or None,
            course_id=self.course_id or None,
            assignment_id=self.assignment_id or None,
            org_id=self.org_id,
        )

    def cmd_report(self) -> None:
        from nbexchange.clock import parse_timestamp
        from nbexchange.errors import NotFound
        from nbexchange.report import RENDERERS, build_report

        if not (self.course_id and self.assignment_id):
            self.log.critical("report needs --course and --assignment")
            self.exit(2)
        _, store = self._open(audit=True)
        try:
            report = build_report(
                store,
                self.course_id,
                self.assignment_id,
                org_id=self.org_id,
                deadline=parse_timestamp(self.deadline) if self.deadline else None,
                as_of=parse_timestamp(self.as_of) if self.as_of else None,
                max_clock_skew=self.max_clock_skew,
            )
        except NotFound as e:
            self.log.critical("%s", e.note)
            self.exit(1)
        try:
            text = RENDERERS[self.report_format](report)
        except ImportError as e:
            self.log.critical("The HTML report plots with matplotlib: pip install 'nbexchange[report]' (%s)", e)
            self.exit(1)
        self._write_out(text)

    def cmd_extract(self) -> None:
        from nbexchange.audit import extract
        from nbexchange.errors import ExchangeError
        from nbexchange.storage import open_archive_store

        if not (self.submission and self.output):
            self.log.critical("extract needs --submission POSITION and --output FILE")
            self.exit(2)
        _, store = self._open(audit=True)
        try:
            sha = extract(store, open_archive_store(self, create=False), self.submission, Path(self.output))
        except ExchangeError as e:
            self.log.critical("%s", e.note)
            self.exit(1)
        print(json.dumps({"position": self.submission, "archive_sha256": sha, "output": self.output}))

    def _write_out(self, text: str) -> None:
        """``text`` to ``--output`` or stdout."""
        if self.output:
            Path(self.output).write_text(text, encoding="utf-8")
            self.log.info("Wrote %s", self.output)
        else:
            _utf8_stdout().write(text)

    def cmd_collect(self) -> None:
        from nbexchange.runtime import Runtime
        from nbexchange.workers.tasks import collect

        runtime = Runtime(self)
        try:
            done = collect(runtime)
        finally:
            runtime.close()
        print(json.dumps({"position": done.position, "blobs": list(done.blobs), "leftovers": list(done.leftovers)}))

    def cmd_rebuild(self) -> None:
        from nbexchange.db import current_revision, head_revision
        from nbexchange.projections import rebuild_all
        from nbexchange.tuning import tune_gc

        engine, _ = self._open(existing=True)
        # A rebuild makes its tables as this code declares them; on an older
        # schema (upgrade_db off) that would leave the tables ahead of the
        # revision alembic records, and the next upgrade would fail on them.
        at, head = current_revision(engine), head_revision()
        if at != head:
            self.log.critical(
                "The database is at revision %s, this code at %s: run `nbexchange upgrade-db` first.", at, head
            )
            self.exit(1)
        tune_gc()
        self.log.info("Rebuilt: %s", rebuild_all(engine))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``nbexchange`` command."""
    app = NbExchange.instance()
    app.initialize(argv)
    app.start()
