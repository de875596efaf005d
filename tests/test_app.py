"""The ``nbexchange`` command: settings from flags, config files and the environment; start-up; the audit commands."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import yaml
from builders import make_archive
from httpclient import until
from service import (
    TEST_BROKER_URL,
    Service,
    corrupt_blob,
    drop_db,
    free_port,
    fresh_db_url,
    service_archives,
    start_service,
    wait_until_up,
)
from service import run_nbexchange as nbexchange

from nbexchange.app import COMMANDS, NbExchange
from nbexchange.db import current_revision, make_engine, upgrade
from nbexchange.events.store import GENESIS, chain_hash
from nbexchange.identity import JupyterHubPlugin, UsersFilePlugin
from nbexchange.projections import PROJECTIONS, snapshot
from nbexchange.projections.base import REBUILDING

#: The environment variables the settings read; cleared so the machine's own never leak in.
SETTINGS_ENV = (
    "JUPYTERHUB_SERVICE_PREFIX",
    "JUPYTERHUB_API_TOKEN",
    "NBEX_BASE_STORE",
    "NBEX_DB_URL",
    "NBEX_BROKER_URL",
    "NBEX_USERS_FILE",
)


def has_log(db_file: Path) -> bool:
    """Whether ``db_file`` is a SQLite database with the log's table."""
    if not db_file.is_file():
        return False
    engine = sa.create_engine(f"sqlite:///{db_file}")
    try:
        return sa.inspect(engine).has_table("events")
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    NbExchange.clear_instance()
    yield
    NbExchange.clear_instance()


# -- the command line ------------------------------------------------------------


def test_help_all_lists_every_setting_with_its_help():
    result = nbexchange("--help-all")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    settings = NbExchange.class_own_traits(config=True)
    assert {"base_url", "db_url", "broker_url", "users_file", "max_upload_size"} <= set(settings)
    for name, trait in settings.items():
        assert f"--NbExchange.{name}=" in result.stdout, name
        assert trait.help, f"NbExchange.{name} has no help"
        assert " ".join(trait.help.split())[:40] in flat, name
    for command in COMMANDS:
        assert f"  {command} " in result.stdout
    # The hub plugin's own settings are discoverable too.
    assert "--JupyterHubPlugin.hub_api_url=" in result.stdout


def trait_help(text: str, option: str) -> list[str]:
    """The lines ``--help-all`` prints for ``option``, up to the next option."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(option + "=")))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("--")), len(lines))
    return lines[start:end]


def test_help_all_shows_the_defaults_computed_at_start_up(tmp_path):
    """Defaults computed from the environment or from another setting show as this command would use them."""
    shown = nbexchange("--help-all").stdout
    expected = {
        "--NbExchange.log_level": "'INFO'",
        "--log-level": "'INFO'",
        "--NbExchange.base_url": "'/services/nbexchange/'",
        "--NbExchange.base_storage_location": "'/tmp/courses'",
        "--NbExchange.db_url": "'sqlite:////tmp/courses/nbexchange.sqlite'",
        "--NbExchange.broker_url": "''",
        "--NbExchange.user_plugin_class": "'nbexchange.identity.users_file.UsersFilePlugin'",
    }
    for option, default in expected.items():
        assert f"    Default: {default}" in trait_help(shown, option), (option, trait_help(shown, option))
    # traitlets' Application is not listed apart with its own (WARN) default: its settings are NbExchange's.
    assert not [line for line in shown.splitlines() if line.startswith("--Application.")]

    store = str(tmp_path / "store")
    env = {"NBEX_BASE_STORE": store, "JUPYTERHUB_SERVICE_PREFIX": "/jhub/services/x", "JUPYTERHUB_API_TOKEN": "t"}
    shown = nbexchange("--help-all", env=env).stdout
    assert f"    Default: 'sqlite:///{store}/nbexchange.sqlite'" in trait_help(shown, "--NbExchange.db_url")
    assert "    Default: '/jhub/services/x/'" in trait_help(shown, "--NbExchange.base_url")
    assert "    Default: 'nbexchange.identity.jupyterhub.JupyterHubPlugin'" in trait_help(
        shown, "--NbExchange.user_plugin_class"
    )


def test_unknown_command_exits_2_naming_the_commands():
    result = nbexchange("frobnicate")
    assert result.returncode == 2
    assert "Unknown command 'frobnicate'" in result.stderr and "verify" in result.stderr


def test_worker_without_a_broker_exits_2():
    result = nbexchange("worker", "--NbExchange.db_url=sqlite:///:memory:")
    assert result.returncode == 2
    assert "needs broker_url" in result.stderr


class _FailingConsumer:
    """Stands in for Celery's worker: stops ``failures`` times on an 'unrecoverable' error, then as if asked to."""

    failures = 0
    runs = 0

    def __init__(self, **options: Any) -> None:
        self.exitcode: int | None = None

    def start(self) -> None:
        type(self).runs += 1
        self.exitcode = 1 if type(self).runs <= type(self).failures else 0


@pytest.mark.parametrize("failures, runs, code", [(2, 3, 0), (100, 6, 1)])
def test_a_worker_process_starts_its_consumer_again_after_an_error(tmp_path, monkeypatch, failures, runs, code):
    """Celery gives up on some broker errors (kombu's, when Redis vanishes mid-acknowledgement); the process
    starts it again, but not forever."""
    from celery import Celery

    monkeypatch.setattr(_FailingConsumer, "failures", failures)
    monkeypatch.setattr(_FailingConsumer, "runs", 0)
    monkeypatch.setattr(Celery, "Worker", property(lambda app: _FailingConsumer))
    app = NbExchange(
        db_url=f"sqlite:///{tmp_path}/exchange.sqlite",
        broker_url="redis://127.0.0.1:1/0",  # nothing listens: the consumer above never connects anyway
        base_storage_location=str(tmp_path),
        sweep_interval=3600,
    )
    with pytest.raises(SystemExit) as exited:
        app.cmd_worker()
    assert (exited.value.code, _FailingConsumer.runs) == (code, runs)


# -- where settings come from ----------------------------------------------------


@pytest.mark.parametrize(
    "variable, trait, value, expected",
    [
        ("JUPYTERHUB_SERVICE_PREFIX", "base_url", "/services/other-exchange", "/services/other-exchange/"),
        ("NBEX_BASE_STORE", "base_storage_location", "/srv/nbexchange", "/srv/nbexchange"),
        ("NBEX_DB_URL", "db_url", "postgresql+psycopg://nbx@db/nbx", "postgresql+psycopg://nbx@db/nbx"),
        ("NBEX_BROKER_URL", "broker_url", "redis://redis:6379/0", "redis://redis:6379/0"),
        ("NBEX_USERS_FILE", "users_file", "/etc/nbexchange/users.yaml", "/etc/nbexchange/users.yaml"),
    ],
)
def test_environment_sets_the_matching_setting(monkeypatch, variable, trait, value, expected):
    default = getattr(NbExchange(), trait)
    assert default != expected
    NbExchange.clear_instance()
    monkeypatch.setenv(variable, value)
    assert getattr(NbExchange(), trait) == expected
    NbExchange.clear_instance()
    # A setting given explicitly beats the environment.
    assert getattr(NbExchange(**{trait: "/explicit/"}), trait) == "/explicit/"


def test_broker_url_from_the_environment_turns_the_embedded_worker_off(monkeypatch):
    assert NbExchange().embedded
    NbExchange.clear_instance()
    monkeypatch.setenv("NBEX_BROKER_URL", "redis://redis:6379/0")
    assert not NbExchange().embedded


def test_default_database_is_a_sqlite_file_in_the_store(tmp_path, monkeypatch):
    assert NbExchange(base_storage_location=str(tmp_path)).db_url == f"sqlite:///{tmp_path}/nbexchange.sqlite"
    NbExchange.clear_instance()
    monkeypatch.setenv("NBEX_BASE_STORE", str(tmp_path / "env"))
    assert NbExchange().db_url == f"sqlite:///{tmp_path}/env/nbexchange.sqlite"


def test_environment_reaches_the_real_command(tmp_path):
    store = tmp_path / "store"
    result = nbexchange("upgrade-db", env={"NBEX_BASE_STORE": str(store)})
    assert result.returncode == 0, result.stderr
    assert has_log(store / "nbexchange.sqlite")
    result = nbexchange("upgrade-db", env={"NBEX_DB_URL": f"sqlite:///{tmp_path}/from-env.sqlite"})
    assert result.returncode == 0, result.stderr
    assert has_log(tmp_path / "from-env.sqlite")


@pytest.mark.parametrize(
    "given, expected",
    [("x/y", "/x/y/"), ("/x/y", "/x/y/"), ("x/y/", "/x/y/"), ("//x///y//", "/x/y/"), ("", "/"), ("/", "/")],
)
def test_base_url_is_normalised(given, expected):
    assert NbExchange(base_url=given).base_url == expected


def test_config_file_in_the_working_folder_is_loaded_and_flags_beat_it(tmp_path):
    (tmp_path / "nbexchange_config.py").write_text(f"c.NbExchange.db_url = 'sqlite:///{tmp_path}/from-file.sqlite'\n")
    result = nbexchange("upgrade-db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert has_log(tmp_path / "from-file.sqlite")
    (tmp_path / "from-file.sqlite").unlink()
    result = nbexchange("upgrade-db", f"--NbExchange.db_url=sqlite:///{tmp_path}/from-flag.sqlite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert has_log(tmp_path / "from-flag.sqlite") and not (tmp_path / "from-file.sqlite").exists()


def test_config_option_loads_the_named_file_and_refuses_a_bad_one(tmp_path):
    elsewhere = tmp_path / "etc" / "exchange.py"
    elsewhere.parent.mkdir()
    elsewhere.write_text(f"c.NbExchange.db_url = 'sqlite:///{tmp_path}/named.sqlite'\n")
    result = nbexchange("upgrade-db", f"--config={elsewhere}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert has_log(tmp_path / "named.sqlite")

    missing = nbexchange("upgrade-db", f"--config={tmp_path / 'nope.py'}", cwd=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr

    elsewhere.write_text("c.NbExchange.db_url = (\n")
    broken = nbexchange("upgrade-db", f"--config={elsewhere}", cwd=tmp_path)
    assert broken.returncode != 0 and "SyntaxError" in broken.stderr


def test_jupyterhub_identity_is_the_default_under_the_hub(tmp_path, monkeypatch):
    config = tmp_path / "nbexchange_config.py"
    config.write_text("c.JupyterHubPlugin.cache_ttl = 5.0\n")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "service-token")
    app = NbExchange.instance()
    app.initialize([f"--config={config}"])
    assert app.user_plugin_class is JupyterHubPlugin
    plugin = app.make_user_plugin()
    assert isinstance(plugin, JupyterHubPlugin)
    assert plugin.api_token == "service-token" and plugin.cache_ttl == 5.0

    # A users file, where one is given, wins over the hub.
    NbExchange.clear_instance()
    monkeypatch.setenv("NBEX_USERS_FILE", str(tmp_path / "users.yaml"))
    assert NbExchange().user_plugin_class is UsersFilePlugin
    NbExchange.clear_instance()
    monkeypatch.delenv("NBEX_USERS_FILE")
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
    assert NbExchange().user_plugin_class is UsersFilePlugin


# -- starting up without an identity ---------------------------------------------


def test_demo_users_file_is_made_for_a_loopback_service(tmp_path):
    store, port = tmp_path / "store", free_port()
    log = tmp_path / "api.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbexchange",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--NbExchange.base_storage_location={store}",
                "--NbExchange.base_url=demo//exchange",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean,
        )
    service = Service(f"http://127.0.0.1:{port}/demo/exchange/", {}, tmp_path, "", "", [], [proc], [log])
    try:
        wait_until_up(service)
        demo = store / "demo-users.yaml"
        assert stat.S_IMODE(demo.stat().st_mode) == 0o600
        assert str(demo) in log.read_text()
        instructor = yaml.safe_load(demo.read_text())["users"][0]
        assert instructor["courses"] == {"demo101": "Instructor"}
        answer = requests.get(
            service.url + "assignments",
            params={"course_id": "demo101"},
            headers={"Authorization": f"token {instructor['token']}"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.json()["value"] == []
    finally:
        service.stop()
    assert proc.returncode == 0, service.log_text()


def test_no_identity_on_another_address_refuses_to_start(tmp_path):
    # 127.0.0.2 is loopback, so nothing listens beyond this machine even if the check failed;
    # a service that did start would run until the timeout kills it, failing the test.
    store = tmp_path / "store"
    argv = ("--ip=127.0.0.2", f"--port={free_port()}", f"--NbExchange.base_storage_location={store}")
    result = nbexchange(*argv, timeout=60)
    assert result.returncode == 1
    assert "No identity is configured" in result.stderr and "NBEX_USERS_FILE" in result.stderr
    assert "nbexchange listening on" not in result.stderr
    assert not (store / "demo-users.yaml").exists()


# -- the audit commands, end to end ----------------------------------------------


@dataclass
class Audited:
    """A stopped exchange with a release and two submissions in its log."""

    service: Service
    first: int  # position of s1's submission
    second: int  # position of s2's submission
    sha: dict[str, str]  # student -> their submission's archive sha256

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return nbexchange(*args, *self.service.flags)

    def verify(self) -> tuple[int, dict[str, Any]]:
        result = self.run("verify")
        return result.returncode, json.loads(result.stdout)


USERS = {
    "ada": {"phys101": "Instructor"},
    "s1": {"phys101": "Student"},
    "s2": {"phys101": "Student"},
    "other_org_ada": {"phys101": "Instructor"},
}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    root = tmp_path_factory.mktemp("audited")
    url, token = fresh_db_url(root)
    svc = start_service(root, USERS, db_url=url, broker_url=TEST_BROKER_URL, orgs={"other_org_ada": 2})

    def post(route: str, who: str, params: dict[str, str], archive: bytes) -> int:
        answer = requests.post(
            svc.url + route,
            params=params,
            files={"assignment": ("a.tar.gz", archive)},
            headers=svc.headers(who),
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        return int(answer.json()["position"])

    try:
        ps1 = {"course_id": "phys101", "assignment_id": "ps1"}
        post("assignment", "ada", ps1, make_archive())
        post("assignment", "other_org_ada", {"course_id": "phys101", "assignment_id": "ps-other"}, make_archive())
        until(
            lambda: requests.get(svc.url + "assignment", params=ps1, headers=svc.headers("s1")).status_code == 200,
            30,
            svc.log_text,
        )
        stamp = {"timestamp": "2026-01-31 23:59:00.000000 UTC"}
        first = post("submission", "s1", {**ps1, **stamp}, make_archive({"nb1.ipynb": b"s1's work"}))
        second = post("submission", "s2", {**ps1, **stamp}, make_archive({"nb1.ipynb": b"s2's work"}))

        def checked() -> bool:
            # Wait for the workers' outcomes, so the log is complete when the service stops.
            items = (
                requests.get(
                    svc.url + "collections", params={**ps1, "min_position": second}, headers=svc.headers("ada")
                )
                .json()
                .get("value", [])
            )
            return len(items) == 2 and all(i["archive"]["state"] == "unpacked" for i in items)

        until(checked, 30, svc.log_text)
        events = requests.get(svc.url + "events", params={**ps1, "limit": 1000}, headers=svc.headers("ada")).json()
        sha = {
            e["payload"]["student_id"]: e["payload"]["archive_sha256"]
            for e in events["value"]
            if e["type"] == "submitted"
        }
    finally:
        svc.stop()
    yield Audited(svc, first, second, sha)
    drop_db(token)


def test_verify_passes_on_an_intact_log(audited):
    status, report = audited.verify()
    assert status == 0 and report["ok"] is True and report["faults"] == []
    assert report["events"] >= audited.second and len(report["head_hash"]) == 64
    assert report["archives"] >= 3  # two releases' archives (identical bytes: one) and two submissions


def test_export_writes_one_line_per_event_whose_hashes_chain(audited, tmp_path):
    out = tmp_path / "log.jsonl"
    result = audited.run("export", f"--output={out}")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    _, report = audited.verify()
    assert len(events) == report["events"]
    assert [e["position"] for e in events] == list(range(1, len(events) + 1))
    previous = GENESIS
    for event in events:
        assert event["prev_hash"] == previous
        # The export alone is enough to recompute the chain, without the database.
        fields = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        assert chain_hash(event["prev_hash"], fields) == event["hash"]
        previous = event["hash"]
    assert previous == report["head_hash"]

    # The standalone check that docs/auditing.md gives auditors agrees.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "auditing.md").read_text()
    checker = tmp_path / "check_chain.py"
    checker.write_text(re.search(r"```python\n(.*?)```", docs, re.S).group(1))
    result = subprocess.run([sys.executable, str(checker), str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{len(events)} events, head hash {report['head_hash']}"


def test_replay_is_repeatable_and_stops_at_the_position(audited):
    args = ("replay", f"--until-position={audited.first}", "--course=phys101")
    once, twice = audited.run(*args), audited.run(*args)
    assert once.returncode == 0, once.stderr
    assert once.stdout == twice.stdout
    view = json.loads(once.stdout)
    assert view["until_position"] == audited.first
    (course,) = view["courses"]
    (ps1,) = course["assignments"]
    assert [(s["student_id"], s["position"]) for s in ps1["submissions"]] == [("s1", audited.first)]

    later = json.loads(audited.run("replay", "--course=phys101").stdout)
    subs = later["courses"][0]["assignments"][0]["submissions"]
    assert sorted(s["student_id"] for s in subs) == ["s1", "s2"]
    assert {s["student_id"]: s["archive_sha256"] for s in subs} == audited.sha
    # Each organisation is replayed on its own.
    theirs = json.loads(audited.run("replay", "--course=phys101", "--org=2").stdout)
    assert [a["assignment_id"] for a in theirs["courses"][0]["assignments"]] == ["ps-other"]


def test_rebuild_gives_the_read_models_the_service_built(audited):
    engine = make_engine(audited.service.db_url)
    try:
        before = {p.name: snapshot(engine, p) for p in PROJECTIONS}
        with engine.begin() as conn:  # rows only a rebuild (not a catch-up) brings back
            for projection in PROJECTIONS:
                for table in projection.tables:
                    conn.execute(table.delete())
        result = audited.run("rebuild")
        assert result.returncode == 0, result.stderr
        assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == before
    finally:
        engine.dispose()


def test_rebuild_refuses_a_database_behind_the_code(tmp_path):
    """With upgrade_db off, a rebuild would make tables ahead of the revision alembic records."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    upgrade(engine, "0004")
    result = nbexchange("rebuild", f"--NbExchange.db_url={url}", "--NbExchange.upgrade_db=False")
    assert result.returncode == 1 and "run `nbexchange upgrade-db` first" in result.stderr, result.stderr
    assert current_revision(engine) == "0004"
    assert not [t for t in sa.inspect(engine).get_table_names() if t.endswith(REBUILDING)]
    engine.dispose()


@pytest.fixture
def events_table(audited) -> Iterator[sa.Engine]:
    engine = sa.create_engine(audited.service.db_url)
    yield engine
    engine.dispose()


def test_verify_names_a_changed_event(audited, events_table):
    position = audited.first
    with events_table.begin() as conn:
        original = conn.execute(sa.text("SELECT payload FROM events WHERE position = :p"), {"p": position}).scalar_one()
        backdated = json.loads(original)
        backdated["timestamp"] = "2026-01-30T09:00:00.000000+00:00"  # "I submitted a day early"
        conn.execute(
            sa.text("UPDATE events SET payload = :payload WHERE position = :p"),
            {"payload": json.dumps(backdated), "p": position},
        )
    try:
        status, report = audited.verify()
    finally:
        with events_table.begin() as conn:
            conn.execute(
                sa.text("UPDATE events SET payload = :payload WHERE position = :p"),
                {"payload": original, "p": position},
            )
    assert status == 1 and report["ok"] is False
    assert [(f["position"], "changed" in f["reason"]) for f in report["faults"]] == [(position, True)]
    assert audited.verify()[0] == 0


def test_verify_names_a_removed_event(audited, events_table):
    position = audited.first
    with events_table.begin() as conn:
        row = conn.execute(sa.text("SELECT * FROM events WHERE position = :p"), {"p": position}).mappings().one()
        conn.execute(sa.text("DELETE FROM events WHERE position = :p"), {"p": position})
    try:
        status, report = audited.verify()
    finally:
        with events_table.begin() as conn:
            columns = ", ".join(row.keys())
            values = ", ".join(f":{name}" for name in row)
            conn.execute(sa.text(f"INSERT INTO events ({columns}) VALUES ({values})"), dict(row))
    assert status == 1
    reasons = {f["position"]: f["reason"] for f in report["faults"]}
    assert "missing" in reasons[position] and "prev_hash" in reasons[position + 1]
    assert audited.verify()[0] == 0


def test_verify_names_a_changed_archive(audited):
    sha = audited.sha["s2"]
    with service_archives(audited.service).open(sha) as stored:
        original = stored.read()
    corrupt_blob(audited.service, sha, original + b"\0")
    try:
        status, report = audited.verify()
    finally:
        corrupt_blob(audited.service, sha, original)
    assert status == 1
    assert [f["position"] for f in report["faults"]] == [audited.second]
    assert sha in report["faults"][0]["reason"] and "does not match" in report["faults"][0]["reason"]


def test_audit_commands_never_create_the_database_they_read(tmp_path):
    missing = tmp_path / "typo.sqlite"
    for command in ("verify", "export", "replay"):
        result = nbexchange(command, f"--NbExchange.db_url=sqlite:///{missing}")
        assert result.returncode == 1, (command, result.stdout)
        assert "no nbexchange log" in result.stderr
    assert not missing.exists()
