"""A real JupyterHub on its own ports, with nbexchange as a managed or an external service and servers it spawns.

Nothing here stands in for JupyterHub: the hub, configurable-http-proxy and each
user's single-user server are the real programs, started as an institution
starts them. Users are not system users, so servers are spawned with
``SimpleLocalProcessSpawner``, each in a home of its own under the test's tmp.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from service import PLUGIN_FACTORY_CONFIG, free_port, missing, require, stop_processes

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "hub-test-password"
COURSE = "phys101"
GROUPS = {f"formgrade-{COURSE}": ["ada"], f"nbgrader-{COURSE}": ["s1", "s2"]}
#: The plugin's settings in each home: the factory only. No service_url, no token: the hub's environment gives both.
NBGRADER_CONFIG = "c = get_config()\n" + PLUGIN_FACTORY_CONFIG + f"c.CourseDirectory.course_id = {COURSE!r}\n"


def require_jupyterhub() -> None:
    """The hub's own package and its proxy, from PyPI and npm."""
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        missing("the jupyterhub package is not installed (pip install -e '.[test]')")
    require("configurable-http-proxy", "npm install -g configurable-http-proxy")


def require_redis(url: str) -> None:
    """A Redis server answering at ``url`` (.ci/run starts one)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return
    except OSError:
        pass
    missing(f"no Redis answers at {url}")


def wait_for(check: Callable[[], Any], what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll ``check`` until it answers something true; fail naming ``what`` (and the log) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        try:
            answer = check()
        except requests.RequestException:
            answer = None
        if answer:
            return answer
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s")


@dataclass
class Hub:
    """A running JupyterHub: its public (proxy) URL, its API, an admin token, and the users' servers."""

    root: Path
    public_url: str
    api_url: str
    admin_token: str
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Each spawned server's environment, by user name.
    servers: dict[str, dict[str, str]] = field(default_factory=dict)

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call the hub's REST API as the test's admin service."""
        headers = {"Authorization": f"token {self.admin_token}"}
        return requests.request(method, self.api_url + path, headers=headers, timeout=30, **kwargs)

    def home(self, name: str) -> Path:
        return self.root / "home" / name

    def spawn(self, *names: str) -> list[dict[str, str]]:
        """Start each user's single-user server through the hub's API, all at once; answer the environment
        the spawner gave each server (its own token, the hub's URLs, its HOME), in order."""
        for name in names:
            home = self.home(name)
            home.mkdir(parents=True, exist_ok=True)
            (home / "nbgrader_config.py").write_text(NBGRADER_CONFIG)
            started = self.api("POST", f"/users/{name}/server")
            assert started.status_code in (201, 202), started.text
        for name in names:
            self.servers[name] = self._environment(name)
        return [self.servers[name] for name in names]

    def _environment(self, name: str) -> dict[str, str]:
        def ready() -> dict[str, Any] | None:
            model = self.api("GET", f"/users/{name}").json()
            server = model.get("servers", {}).get("")
            return server if server and server.get("ready") else None

        server = wait_for(ready, f"{name}'s server", 120)
        raw = Path(f"/proc/{server['state']['pid']}/environ").read_bytes()
        env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        assert env["JUPYTERHUB_USER"] == name and env["JUPYTERHUB_API_TOKEN"]
        return env

    def stop(self) -> None:
        """Stop the hub (which stops the servers and the managed service it started), then what the test started."""
        stop_processes(self.procs, timeout=30)


def nbgrader(env: dict[str, str], *args: str, retcode: int = 0) -> str:
    """Run the real ``nbgrader`` command as the user of a spawned server: in its home, with its environment."""
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args],
        cwd=env["HOME"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    assert done.returncode == retcode, f"nbgrader {' '.join(args)} answered {done.returncode}:\n{output}"
    return output


def _service_env(store: Path) -> dict[str, str]:
    """What the exchange needs beyond what the hub gives it: where to keep things (and the code under test)."""
    return {"NBEX_BASE_STORE": str(store), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def start_hub(root: Path, external: bool, hubs: list[Hub], broker_url: str = "") -> Hub:
    """Start a JupyterHub in ``root`` with nbexchange registered as a service; append it to ``hubs`` at once.

    Managed: the hub starts ``nbexchange`` itself and has a public URL; with ``broker_url``,
    the hub also runs ``nbexchange worker`` as a second, URL-less managed service (as
    docs/operations.md shows). External: the test starts ``nbexchange`` with its own hub
    token, and the hub has no public URL, so the plugin finds the service from the hub's
    record of it (the server role may read it).
    """
    root.mkdir()
    proxy_port, hub_port, proxy_api_port, service_port = (free_port() for _ in range(4))
    admin_token, service_token = secrets.token_hex(32), secrets.token_hex(32)
    public_url = f"http://127.0.0.1:{proxy_port}/"
    service: dict[str, Any] = {"name": "nbexchange", "url": f"http://127.0.0.1:{service_port}"}
    services = [service, {"name": "test-admin", "api_token": admin_token}]
    if external:
        service["api_token"] = service_token
    else:
        exchange = [sys.executable, "-m", "nbexchange"]
        environment = _service_env(root / "store")
        if broker_url:
            # Its own queue on the shared Redis, so that no other test's worker takes its messages.
            exchange.append(f"--NbExchange.queue_name=hub-test-{secrets.token_hex(4)}")
            environment["NBEX_BROKER_URL"] = broker_url
            services.append({"name": "nbexchange-worker", "command": [*exchange, "worker"], "environment": environment})
        service["command"] = [*exchange, "--ip=127.0.0.1", f"--port={service_port}"]
        service["environment"] = environment
    settings = {
        "proxy_port": proxy_port,
        "hub_port": hub_port,
        "proxy_api_port": proxy_api_port,
        "root": str(root),
        "admin_token": admin_token,
        "services": services,
        "groups": GROUPS,
        "public_url": None if external else public_url,
        "python": sys.executable,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    (root / "jupyterhub_config.py").write_text(HUB_CONFIG)
    log = root / "hub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_", "CONFIGPROXY_"))}
    env["CONFIGPROXY_AUTH_TOKEN"] = secrets.token_hex(32)
    hub = Hub(root, public_url, f"http://127.0.0.1:{hub_port}/hub/api", admin_token, log)
    hubs.append(hub)
    if external:
        service_env = {
            **env,
            **_service_env(root / "store"),
            "JUPYTERHUB_API_TOKEN": service_token,
            "JUPYTERHUB_API_URL": hub.api_url,
        }
        with open(root / "service.log", "wb") as out:
            hub.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "nbexchange", "--ip=127.0.0.1", f"--port={service_port}"],
                    env=service_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                )
            )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(root / "jupyterhub_config.py")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    hub.procs.insert(0, proc)
    wait_for(lambda: hub.api("GET", "/").status_code == 200, "the hub's API", 60, proc)
    service_url = f"{public_url}services/nbexchange/"
    wait_for(lambda: requests.get(service_url + "health", timeout=5).ok, "the service via the proxy", 60, proc)
    return hub


#: The hub's config: read from settings.json beside it, so that it is plain Python an institution would write.
HUB_CONFIG = """\
import json
import os
from pathlib import Path

here = Path(__file__).parent
settings = json.loads((here / "settings.json").read_text())
c = get_config()  # noqa: F821

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["proxy_port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{settings['proxy_api_port']}"
c.ConfigurableHTTPProxy.pid_file = str(here / "proxy.pid")
c.ConfigurableHTTPProxy.debug = False
c.JupyterHub.db_url = f"sqlite:///{here / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(here / "cookie_secret")
c.JupyterHub.pid_file = str(here / "jupyterhub.pid")
if settings["public_url"]:
    c.JupyterHub.public_url = settings["public_url"]
# The hub checks its services' URLs on this interval; every check must find the service (no 404 warnings).
c.JupyterHub.service_check_interval = 2

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "hub-test-password"
c.Authenticator.allowed_users = {"ada", "s1", "s2"}

c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = str(here / "home" / "{username}")
c.Spawner.cmd = [settings["python"], "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
if os.geteuid() == 0:  # CI containers run as root, which Jupyter Server refuses unless told
    c.Spawner.args = ["--allow-root"]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120

c.JupyterHub.services = settings["services"]
c.JupyterHub.load_groups = settings["groups"]
c.JupyterHub.load_roles = [
    {
        "name": "test-admin",
        "scopes": ["admin:users", "admin:servers", "admin:groups", "read:services"],
        "services": ["test-admin"],
    },
]
if not settings["public_url"]:
    # No public URL: the plugin reads the service's address from the hub's record. A server's token may
    # read it only if the server role asks for it AND its user holds it (a token gets no more than its owner).
    c.JupyterHub.load_roles += [
        {"name": "user", "scopes": ["self", "read:services!service=nbexchange"]},
        {
            "name": "server",
            "scopes": ["users:activity!user", "access:servers!server", "read:services!service=nbexchange"],
        },
    ]
"""
