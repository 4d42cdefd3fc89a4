"""`make test` on a fresh machine: scripts/test_services.py provides PostgreSQL and Redis.

`make test` runs the tests through scripts/test_services.py. When the PostgreSQL and Redis the
tests use (FEDMCP_E2E_POSTGRES, FEDMCP_E2E_REDIS) do not answer, it starts throwaway ones on free
ports, hands their URLs to the tests, and stops them afterwards. These tests force that by
pointing both variables at loopback ports where nothing listens, and watch from the outside: the
command sees working servers (a query, a PING), and when it ends their ports are closed and their
processes gone. The machine's own servers (127.0.0.1:5432 and :6379) are only connected to.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import harness

SCRIPT = harness.ROOT / "scripts" / "test_services.py"

CHILD = r"""
import json, os, sys
import psycopg, redis
out = {"postgres": os.environ["FEDMCP_E2E_POSTGRES"], "redis": os.environ["FEDMCP_E2E_REDIS"]}
with psycopg.connect(out["postgres"]) as conn:
    out["database"], backend = conn.execute("SELECT current_database(), pg_backend_pid()").fetchone()
    conn.execute("CREATE TABLE bootstrap_probe (n int)")  # the server is the test's own
    # While the connection is open: its backend process exits once it closes.
    out["postmaster"] = int(open(f"/proc/{backend}/status").read().split("PPid:")[1].split()[0])
client = redis.Redis.from_url(out["redis"])
out["ping"] = client.ping()
out["redis_pid"] = client.info("server")["process_id"]
json.dump(out, open(sys.argv[1], "w"))
"""


def _forced_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FEDMCP_E2E_POSTGRES": f"postgresql://postgres@127.0.0.1:{harness.free_port()}/test",
        "FEDMCP_E2E_REDIS": f"redis://127.0.0.1:{harness.free_port()}/0",
        "FEDMCP_TEST_SERVICES_DIR": str(tmp_path / "services"),
    }


def _port_of(url: str) -> int:
    return int(re.search(r":(\d+)/", url).group(1))


def _exited(pid: int) -> bool:
    """Whether `pid` has exited: no such process, or a zombie (dead; this container's init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _assert_gone(pid: int, port: int) -> None:
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _exited(pid), f"process {pid} is still there"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_starts_uses_and_stops_its_own_servers_when_none_answer(tmp_path: Path) -> None:
    report = tmp_path / "seen.json"
    env = _forced_env(tmp_path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--", sys.executable, "-c", CHILD, str(report)],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(report.read_text())
    assert seen["postgres"] != env["FEDMCP_E2E_POSTGRES"] and seen["redis"] != env["FEDMCP_E2E_REDIS"]
    assert seen["database"] == "test"
    assert seen["ping"] is True
    assert f"pid {seen['postmaster']}" in result.stderr and f"pid {seen['redis_pid']}" in result.stderr
    _assert_gone(seen["postmaster"], _port_of(seen["postgres"]))
    _assert_gone(seen["redis_pid"], _port_of(seen["redis"]))
    assert not (tmp_path / "services" / "pg").exists() and not (tmp_path / "services" / "redis").exists()


def test_the_commands_exit_status_is_passed_on(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--", sys.executable, "-c", "raise SystemExit(3)"],
        env=_forced_env(tmp_path), capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "stopped PostgreSQL" in result.stderr and "stopped Redis" in result.stderr


def test_sigterm_stops_the_command_and_the_servers(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--", "sleep", "120"],
        env=_forced_env(tmp_path), stderr=subprocess.PIPE, text=True,
    )
    started: dict[str, tuple[int, int]] = {}
    try:
        while len(started) < 2:
            line = process.stderr.readline()
            assert line, "the script ended before starting both servers"
            if match := re.search(r"started (PostgreSQL|Redis).* on 127\.0\.0\.1:(\d+), pid (\d+)", line):
                started[match.group(1)] = (int(match.group(3)), int(match.group(2)))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for pid, port in started.values():
        _assert_gone(pid, port)


def test_uses_the_usual_servers_when_they_answer(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDMCP_E2E_POSTGRES", "FEDMCP_E2E_REDIS")}
    env["FEDMCP_E2E_POSTGRES"] = harness.POSTGRES_ADMIN_DSN
    env["FEDMCP_E2E_REDIS"] = harness.REDIS_URL
    env["FEDMCP_TEST_SERVICES_DIR"] = str(tmp_path / "services")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--", sys.executable, "-c",
         "import os, json; print(json.dumps([os.environ['FEDMCP_E2E_POSTGRES'], os.environ['FEDMCP_E2E_REDIS']]))"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [harness.POSTGRES_ADMIN_DSN, harness.REDIS_URL]
    assert "started" not in result.stderr
    assert not (tmp_path / "services").exists()
