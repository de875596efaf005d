"""Several hosts: the deadline burst through HAProxy against one API host, then two, on a virtual network.

Usage (as root; see ``bench/README.md``, section "Several hosts")::

    python bench/hosts.py                                  # N=500, S=256 KB, C=32: one API host, then two
    python bench/hosts.py --students 2000 --size 1MB --concurrency 64

Not part of the test suite. Each run builds the hosts of
``tests/hosts/topology.py`` afresh (network namespaces joined by a bridge: a
services host with its own PostgreSQL, Redis and S3 server, a worker host, one or two
API hosts, and HAProxy with the load generator on the balancer's host), runs
``bench/loadgen.py``'s deadline scenario against HAProxy, and deletes
everything. This process enters the balancer's namespace, so the load
generator, as in ``bench/deadline.py``, talks to 127.0.0.1 only: HAProxy's
address there. All hosts share this machine's cores.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deadline import (
    COURSE,
    LoadGen,
    cpu_between,
    peaks,
    release,
    size_arg,
    summarize_deadline,
    target,
)
from harness import BENCH, ROOT, Servers, machine, write_users

sys.path.insert(0, str(ROOT / "tests" / "hosts"))
from topology import LB_PORT, Topology, start_balancer, start_exchange, start_services, store_flags  # noqa: E402

RESULTS = BENCH / "results"
CLONE_NEWNET = 0x40000000


def enter(topo: Topology, host: str) -> None:
    """Move this process (single-threaded: the calling thread is all of it) into ``host``'s network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{topo.ns(host)}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {topo.ns(host)}")
    finally:
        os.close(fd)


def run(apis: list[str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One deadline burst through HAProxy in front of ``apis``, on hosts built for it and deleted after."""
    root.mkdir(parents=True)
    instructor, students = write_users(root / "users.yaml", args.students, COURSE)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    topo = Topology(root / "hosts", ["services", "lb", *apis, "worker"])
    try:
        topo.build()
        services = start_services(topo, s3=args.blob_store == "s3")
        flags = [
            *store_flags(services, root / "store"),
            f"--NbExchange.users_file={root / 'users.yaml'}",
            f"--NbExchange.worker_concurrency={args.worker_concurrency}",
            # As bench/deadline.py's production mode: the workers share this machine's cores with the APIs.
            "--NbExchange.check_defer_max=20",
        ]
        start_exchange(topo, services, flags, apis)
        start_balancer(topo, apis, server_timeout=300)
        enter(topo, "lb")
        release(LB_PORT, instructor)
        servers = Servers(f"{len(apis)} API host(s)", LB_PORT)
        roles = ["postgres", "redis", *(["s3"] if services.s3_url else []), *apis, "worker", "haproxy"]
        servers.procs = dict(zip(roles, topo.procs, strict=True))
        cfg = target(
            "deadline",
            LB_PORT,
            students=students,
            size=args.size,
            concurrency=args.concurrency,
            window=args.window,
            instructor_token=instructor,
            lag_timeout=args.lag_timeout,
        )
        gen = LoadGen(cfg, root, servers, label=f"hosts-{len(apis)}")
        gen.expect("READY", 600)
        gen.go()
        gen.expect("UPLOADS_DONE", 300 + args.students * max(1, args.size // 1024**2))
        raw = gen.result(args.lag_timeout + 300)
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
        topo.close()
    summary = summarize_deadline(servers.name, raw, args.concurrency)
    summary["cpu_accept_phase"] = cpu_between(
        gen.samples, "GO", "UPLOADS_DONE", gen.times["UPLOADS_DONE"] - gen.times["GO"]
    )
    summary["peak_rss_mb"] = peaks(gen.samples["DONE"])
    (root / "raw.json").write_text(json.dumps(raw))
    return summary


def table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| API hosts | accepted | failures | accepted/s (saturated) | overall/s | accept p50 / p99 / max (ms) "
        "| lost | dup | CPU (cores) during uploads: APIs, worker, haproxy, S3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        cpu = s["cpu_accept_phase"]
        apis = " + ".join(f"{cpu[r]['cores']}" for r in cpu if r.startswith("api"))
        others = ", ".join(f"{cpu[r]['cores']}" for r in ("worker", "haproxy", "s3") if r in cpu)
        lat = s["accept_latency_s"]
        ms = " / ".join("–" if lat[k] is None else f"{1000 * lat[k]:.0f}" for k in ("p50", "p99", "max"))
        lines.append(
            f"| {s['mode']} | {s['accepted']}/{s['students']} | {s['failures'] or 0} | {s['accepted_per_s'] or '–'} "
            f"| {s['accepted_per_s_overall']} | {ms} | {s['lost']} | {s['duplicates']} | {apis}, {others} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=int, default=500, help="N: students who fetch and submit")
    p.add_argument("--size", type=size_arg, default=256 * 1024, help="S: bytes per submitted archive")
    p.add_argument("--concurrency", type=int, default=32, help="C: the load generator's connections")
    p.add_argument("--window", type=float, default=5.0, help="seconds over which arrivals come")
    p.add_argument("--worker-concurrency", type=int, default=2, help="threads of the worker host's worker")
    p.add_argument(
        "--blob-store",
        choices=("s3", "local"),
        default="s3",
        help="archives on the services host's S3 server (moto's), or in a folder every host shares",
    )
    p.add_argument("--keep", action="store_true", help="keep the hosts' folders and logs")
    p.add_argument("--lag-timeout", type=float, default=120.0, help="longest wait for projections after the uploads")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/hosts.py needs root (network namespaces)")
    # Every host runs this tree's nbexchange, whatever is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.strftime("%Y%m%d-%H%M%S")
    summaries = []
    tmp = Path(tempfile.mkdtemp(prefix="nbex-bench-hosts-"))
    try:
        for apis in (["api1"], ["api1", "api2"]):
            summaries.append(run(apis, tmp / f"{len(apis)}-hosts", args))
    finally:
        if args.keep:
            print(f"kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hosts-{started}.json"
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "summaries": summaries}, indent=2))
    print(table(summaries))
    print(f"\nraw: {out}")


if __name__ == "__main__":
    main()
