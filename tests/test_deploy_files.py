"""The Dockerfile and docker-compose.yml, checked without Docker: names, settings and flags the app really has."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nbexchange.app import COMMANDS, NbExchange

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
#: The services that run this project's image (the others are PostgreSQL and Redis).
OURS = {name: svc for name, svc in SERVICES.items() if svc.get("build") == "."}


#: What the AWS SDK (boto3, for the S3 archive store) reads from the environment itself.
AWS_SDK_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) for each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")
    ]


def instruction(name: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == name]


def environment_variables_read_by_the_code() -> set[str]:
    names: set[str] = set()
    for source in (ROOT / "nbexchange").rglob("*.py"):
        names.update(re.findall(r'os\.environ(?:\.get\(|\[)\s*"([A-Z0-9_]+)"', source.read_text()))
    return names


def interpolated(value: str) -> str:
    """A compose value with ``${VAR...}`` replaced as compose would, given VAR=secret (``${VAR:-default}``: unset)."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+[^}]*\}", "secret", value)


def mount_target(service: dict[str, Any], source: str) -> str:
    (target,) = [v.split(":")[1] for v in service["volumes"] if v.split(":")[0] == source]
    return target


@pytest.fixture(scope="module")
def help_all() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "nbexchange", "--help-all"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- docker-compose.yml ----------------------------------------------------------


def test_compose_describes_the_production_topology():
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(SERVICES)
    assert set(OURS) == {"migrate", "api", "worker"}
    assert SERVICES["api"]["deploy"]["replicas"] == 2
    assert SERVICES["worker"]["deploy"]["replicas"] == 2
    assert SERVICES["api"]["command"][:2] == ["nbexchange", "--ip=0.0.0.0"]
    assert SERVICES["worker"]["command"][:2] == ["nbexchange", "worker"]
    assert SERVICES["migrate"]["command"] == ["nbexchange", "upgrade-db"]
    for name in ("api", "worker"):
        # Only the migrate service changes the schema, and the others wait for it.
        assert "--NbExchange.upgrade_db=False" in SERVICES[name]["command"]
        assert SERVICES[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert SERVICES[name]["volumes"] == SERVICES["api"]["volumes"], "one shared archive store"
    assert "store" in COMPOSE["volumes"]


@pytest.mark.parametrize("name", sorted(OURS))
def test_compose_environment_names_settings_that_exist(name, monkeypatch):
    service = OURS[name]
    env = {key: interpolated(str(value)) for key, value in service["environment"].items()}
    assert set(env) - AWS_SDK_VARIABLES <= environment_variables_read_by_the_code(), "a variable nothing reads"
    assert {"NBEX_DB_URL", "NBEX_BROKER_URL", "NBEX_USERS_FILE", "NBEX_BASE_STORE"} <= set(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    NbExchange.clear_instance()
    try:
        settings = NbExchange()
        assert settings.db_url == env["NBEX_DB_URL"] and settings.db_url.startswith("postgresql+psycopg://")
        assert settings.broker_url == env["NBEX_BROKER_URL"] and not settings.embedded
        assert settings.users_file == env["NBEX_USERS_FILE"] == mount_target(service, "./users.yaml")
        assert settings.base_storage_location == env["NBEX_BASE_STORE"] == mount_target(service, "store")
        assert settings.base_url == env["JUPYTERHUB_SERVICE_PREFIX"]
        # The s3 profile's object store, which the services reach by its compose name.
        assert settings.blob_store == env["NBEX_BLOB_STORE"] == "local"
        assert settings.s3_bucket and settings.s3_endpoint_url.split("//")[1].split(":")[0] in SERVICES
        assert "s3" in SERVICES["minio"]["profiles"]
        monkeypatch.setenv("NBEX_BLOB_STORE", "s3")
        NbExchange.clear_instance()
        assert NbExchange().blob_store == "s3"
    finally:
        NbExchange.clear_instance()
    host = re.search(r"@([^:/]+):", env["NBEX_DB_URL"])
    assert host and host.group(1) in SERVICES
    assert env["NBEX_BROKER_URL"].split("//")[1].split(":")[0] in SERVICES


def command_lines() -> dict[str, list[str]]:
    lines = {f"compose:{name}": svc["command"] for name, svc in OURS.items()}
    (cmd,) = instruction("CMD")
    lines["Dockerfile"] = json.loads(cmd)
    return lines


@pytest.mark.parametrize("where, argv", sorted(command_lines().items()))
def test_command_lines_use_commands_and_flags_the_app_accepts(where, argv, help_all):
    assert argv[0] == "nbexchange"
    args = argv[1:]
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f"{flag}=" in help_all, f"{where}: {flag} is not a flag of nbexchange"
        else:
            assert arg in COMMANDS, f"{where}: {arg} is not a command"
    # The real parser takes the whole line (show-config stops it before it would start).
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_"))}
    result = subprocess.run(
        [sys.executable, "-m", "nbexchange", *args, "--show-config-json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    if "--ip=0.0.0.0" in args:
        assert config["NbExchange"]["ip"] == "0.0.0.0"


# -- Dockerfile ------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_server_image():
    assert instruction("FROM") == ["python:3.11-slim"]
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    assert any("useradd" in run and run.rstrip().split("&&")[0].split()[-1] == user for run in instruction("RUN"))
    assert instruction("EXPOSE") == ["9000"]
    assert json.loads(instruction("CMD")[0]) == ["nbexchange", "--ip=0.0.0.0"]

    # The server's distribution only: what it is built from, and never the plugin.
    sources = [part for copy in instruction("COPY") for part in shlex.split(copy)[:-1]]
    assert sources and all((ROOT / source).exists() for source in sources), sources
    assert not any("plugin" in part for part in sources)
    assert any("pip install ." in run for run in instruction("RUN"))
    assert not any("plugin" in run for run in instruction("RUN"))


def test_dockerfile_store_and_health_check_agree_with_the_app_and_compose():
    env = " ".join(instruction("ENV"))
    store = re.search(r"NBEX_BASE_STORE=(\S+)", env)
    assert store and store.group(1) == mount_target(SERVICES["api"], "store")
    assert json.loads(instruction("VOLUME")[0]) == [store.group(1)]

    (check,) = instruction("HEALTHCHECK")
    argv = json.loads(check.split("CMD", 1)[1])
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")  # valid Python
    url = re.search(r"'(http://[^']+)'", argv[2])
    assert url and url.group(1) == f"http://127.0.0.1:{instruction('EXPOSE')[0]}/services/nbexchange/health"
    for service in ("migrate", "worker"):
        assert SERVICES[service]["healthcheck"] == {"disable": True}, "no HTTP in that container"
