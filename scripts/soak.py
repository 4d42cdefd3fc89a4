"""Soak one daphne worker: host clients call tools for SOAK_MINUTES while its RSS is sampled.

Used by `make soak`. One worker on PostgreSQL + Redis when both answer (FEDMCP_E2E_POSTGRES,
FEDMCP_E2E_REDIS, as for the end-to-end tests), else on SQLite and the in-memory channel layer;
one fixture upstream over Streamable HTTP (tests/fixtures/everything_server.py). SOAK_HOSTS hosts
share out the four host transports (Streamable HTTP in both eras, WebSocket, legacy HTTP+SSE) and
call `add` (and every tenth call `slow_echo`, which sends progress) back to back with a short
pause; every SOAK_RECONNECT calls a host closes its session and opens a new one, as hosts come
and go. The worker's RSS is read from /proc every SOAK_SAMPLE seconds.

Writes build/soak.json: the samples (minute, RSS MB, calls so far), calls, errors (and the first
few), the RSS slope over the last half in MB/min, and the slope of each quarter (does it fall?);
prints a one-line summary. Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from bench.loadgen import CLIENTS, CallError, Client  # noqa: E402
from tests.e2e import harness  # noqa: E402

TRANSPORTS = {"http-modern": "/mcp", "http-legacy": "/mcp", "ws": "/ws", "sse": "/sse"}


def services_available() -> bool:
    """Whether the PostgreSQL and Redis the end-to-end tests use both answer."""
    try:
        psycopg.connect(harness.POSTGRES_ADMIN_DSN, connect_timeout=3).close()
        client = redis.Redis.from_url(harness.REDIS_URL, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (psycopg.Error, redis.RedisError, OSError):
        return False
    return True


@contextlib.contextmanager
def backing_services(use_services: bool) -> Iterator[tuple[str | None, dict[str, str]]]:
    """Yield (DATABASE_URL or None for SQLite, the Redis environment) for the gateway."""
    if not use_services:
        yield None, {}
        return
    with harness.postgres_database("fedmcp_soak") as database_url, harness.redis_prefix("fedmcp-soak") as prefix:
        yield database_url, {"REDIS_URL": harness.REDIS_URL, "FEDMCP_REDIS_PREFIX": prefix}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


class Counters:
    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.sessions = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(text[:300])


async def host(n: int, base: str, token: str, deadline: float, opts: argparse.Namespace, counters: Counters) -> None:
    transport = list(TRANSPORTS)[n % len(TRANSPORTS)]
    scheme = "ws" if transport == "ws" else "http"
    spec = {"transport": transport, "url": f"{scheme}{base.removeprefix('http')}{TRANSPORTS[transport]}", "token": token}
    i = 0
    while time.monotonic() < deadline:
        client: Client = CLIENTS[transport](spec)
        try:
            await asyncio.wait_for(client.start(), 60)
            counters.sessions += 1
            for _ in range(opts.reconnect):
                if time.monotonic() >= deadline:
                    break
                i += 1
                if i % 10 == 0:
                    tool, arguments, expected = "fixture__slow_echo", {"text": f"h{n}-{i}", "delay_ms": 20}, f"h{n}-{i}"
                else:
                    tool, arguments, expected = "fixture__add", {"a": i, "b": n}, str(i + n)
                result = await asyncio.wait_for(client.call(tool, arguments), 60)
                text = result["content"][0]["text"]
                if expected not in text:
                    raise CallError(f"{tool} answered {text!r}, expected {expected!r}")
                counters.calls += 1
                await asyncio.sleep(opts.pause)
        except (CallError, OSError, asyncio.IncompleteReadError, TimeoutError, KeyError, ValueError) as exc:
            counters.error(f"{transport}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 10)


async def soak(pid: int, base: str, token: str, opts: argparse.Namespace) -> tuple[list[dict[str, float]], Counters]:
    counters = Counters()
    begin = time.monotonic()
    deadline = begin + opts.minutes * 60
    samples: list[dict[str, float]] = []

    async def sampler() -> None:
        while True:
            samples.append({"minute": round((time.monotonic() - begin) / 60, 3), "rss_mb": round(rss_mb(pid), 2), "calls": counters.calls})
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(opts.sample, max(0.0, deadline - time.monotonic())))

    hosts = [asyncio.create_task(host(n, base, token, deadline, opts, counters)) for n in range(opts.hosts)]
    await sampler()
    await asyncio.wait(hosts, timeout=120)
    return samples, counters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")))
    parser.add_argument("--hosts", type=int, default=int(os.environ.get("SOAK_HOSTS", "8")))
    parser.add_argument("--sample", type=float, default=float(os.environ.get("SOAK_SAMPLE", "30")), help="seconds between RSS samples")
    parser.add_argument("--pause", type=float, default=float(os.environ.get("SOAK_PAUSE", "0.2")), help="seconds each host waits between calls")
    parser.add_argument("--reconnect", type=int, default=int(os.environ.get("SOAK_RECONNECT", "500")), help="calls per host session")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak.json")
    opts = parser.parse_args()

    use_services = services_available()
    with (
        backing_services(use_services) as (database_url, redis_env),
        harness.fixture_server(name="fixture") as fixture_url,
        harness.Gateway(name="soak", env={"FEDMCP_LOG_LEVEL": "WARNING", **redis_env}, database_url=database_url) as gateway,
    ):
        gateway.migrate()
        gateway.command("peer", "add", "fixture", "--url", fixture_url)
        token = gateway.token()
        port = gateway.start_worker()
        pid = gateway.workers[0][0].pid
        started = datetime.datetime.now(datetime.UTC)
        samples, counters = asyncio.run(soak(pid, f"http://127.0.0.1:{port}", token, opts))
        alive = gateway.workers[0][0].poll() is None
        log_tail = gateway.logs()[-3000:] if counters.errors or not alive else ""

    points = [(s["minute"], s["rss_mb"]) for s in samples]
    half = [p for p in points if p[0] >= opts.minutes / 2]
    quarters = [[p for p in points if q * opts.minutes / 4 <= p[0] <= (q + 1) * opts.minutes / 4] for q in range(4)]
    last_half_slope = slope(half)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "backend": "postgresql+redis" if use_services else "sqlite+in-memory",
        "minutes": opts.minutes,
        "hosts": opts.hosts,
        "calls": counters.calls,
        "errors": counters.errors,
        "first_errors": counters.first_errors,
        "sessions": counters.sessions,
        "worker_alive": alive,
        "rss_start_mb": points[0][1] if points else None,
        "rss_end_mb": points[-1][1] if points else None,
        "slope_last_half_mb_per_min": None if last_half_slope is None else round(last_half_slope, 4),
        "slope_by_quarter_mb_per_min": [None if (s := slope(q)) is None else round(s, 4) for q in quarters],
        "samples": samples,
    }
    if log_tail:
        report["worker_log_tail"] = log_tail
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"soak: {opts.minutes:g} min, {report['backend']}, {opts.hosts} hosts: {counters.calls} calls, {counters.errors} errors, "
        f"RSS {report['rss_start_mb']} -> {report['rss_end_mb']} MB, last-half slope {report['slope_last_half_mb_per_min']} MB/min "
        f"(quarters {report['slope_by_quarter_mb_per_min']}); {opts.out.relative_to(ROOT) if opts.out.is_relative_to(ROOT) else opts.out}"
    )
    return 0 if counters.errors == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
