"""The real ``nbexchange`` process keeps secrets out of its output: tokens of a bad users file, broker passwords.

A bad users file stops the start with one critical line, no token and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from service import drop_db, free_port, fresh_db_url, run_nbexchange, start_service

SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def refused_start(tmp_path: Path, users_text: str, mode: int) -> str:
    """What a start with this users file printed (stdout and stderr); fails unless it exited 1 without a secret."""
    users = tmp_path / "users.yaml"
    users.write_text(users_text)
    users.chmod(mode)
    done = run_nbexchange(
        "--ip=127.0.0.1",
        f"--port={free_port()}",
        f"--NbExchange.base_storage_location={tmp_path / 'store'}",
        f"--NbExchange.users_file={users}",
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "nbexchange listening on" not in output
    assert "Traceback" not in output and SECRET not in output
    assert "CRITICAL" in output and str(users) in output
    return output


@pytest.mark.parametrize(
    "text, mode, words",
    [
        pytest.param(
            f'users:\n  - name: ada\n    token: "{SECRET}" oops\n    courses: {{phys101: Instructor}}\n',
            0o600,
            ["line 3, column", "not shown"],
            id="malformed next to the token",
            marks=pytest.mark.hostile(
                "Identity and secrets",
                "starting the service with a users file whose token line is malformed (junk after the quoted token)",
                "exit 1 with one critical line naming the file, line and column; the token is not in the output",
            ),
        ),
        pytest.param(
            f'users:\n  - {{name: ada, token: "{SECRET}", courses: {{phys101: Instructor}}}}\n',
            0o644,
            ["mode 644", "chmod 600", "allow_readable_users_file"],
            id="readable by others",
            marks=pytest.mark.hostile(
                "Identity and secrets",
                "starting the service with a well-formed users file of mode 0644",
                "exit 1 with one critical line: chmod 600 it, or set UsersFilePlugin.allow_readable_users_file",
            ),
        ),
    ],
)
def test_a_bad_users_file_stops_the_start_in_one_line_without_the_token(
    tmp_path: Path, text: str, mode: int, words: list[str]
) -> None:
    output = refused_start(tmp_path, text, mode)
    for word in words:
        assert word in output


def test_the_override_lets_a_readable_users_file_start_with_a_warning(tmp_path: Path) -> None:
    flag = "--UsersFilePlugin.allow_readable_users_file=True"
    url, token = fresh_db_url(tmp_path)
    svc = start_service(tmp_path, {"ada": {"phys101": "Instructor"}}, db_url=url, users_mode=0o640, extra=[flag])
    try:
        answer = requests.get(
            svc.url + "assignments", params={"course_id": "phys101"}, headers=svc.headers("ada"), timeout=30
        )
        assert answer.status_code == 200, answer.text
    finally:
        svc.stop()
        drop_db(token)
    log = svc.log_text()
    assert "accepted because allow_readable_users_file is set" in log
    assert svc.tokens["ada"] not in log


@pytest.mark.hostile(
    "Identity and secrets",
    "a broker URL with a password (redis://:<password>@host/0), as the API process logs where it sends work",
    "the password is masked (redis://:**@host/0) in every line the process writes",
)
def test_the_broker_password_is_masked_in_the_log(tmp_path: Path) -> None:
    password = "br0ker-" + SECRET[:12]
    url, token = fresh_db_url(tmp_path)
    broker = f"redis://:{password}@127.0.0.1:1/0"  # nothing listens: only what is logged matters here
    svc = start_service(tmp_path, {"ada": {"phys101": "Instructor"}}, db_url=url, broker_url=broker, workers=0)
    try:
        assert requests.get(svc.url + "health", timeout=30).status_code == 200
    finally:
        svc.stop()
        drop_db(token)
    log = svc.log_text()
    assert "broker redis://:**@127.0.0.1:1/0" in log
    assert password not in log
