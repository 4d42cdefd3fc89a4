"""A killed worker leaves no call unaccounted for: every call its upstream started has an audit row.

Two real daphne workers on PostgreSQL share a fixture upstream that counts the calls it starts
(its `stats` tool, read directly). Worker A serves the calls and is SIGKILLed; worker B's upkeep
finds A's audit intents once their lease (FEDMCP_AUDIT_INTENT_LEASE, short here) has run out and
writes their events as `interrupted`. The SIGTERM side (a drain writes every row itself) is
tests/e2e/test_audit_on_drain.py.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, fixture_server, postgres_database, wait_until
from tests.observability.test_graceful_shutdown import call_tool

pytestmark = pytest.mark.e2e

LEASE = "1.5"
"""FEDMCP_AUDIT_INTENT_LEASE of both workers: a dead worker's intents are found within seconds."""
BOUND = 30.0
"""Bound on every wait; a healthy run needs a fraction of it."""
TOOLS = ("add", "slow_echo")


@pytest.fixture
def fixture_url() -> Iterator[str]:
    with fixture_server(name="fixture") as url:
        yield url


@pytest.fixture
def gateway(request: pytest.FixtureRequest, fixture_url: str) -> Iterator[Gateway]:
    env = {"FEDMCP_AUDIT_INTENT_LEASE": LEASE, **getattr(request, "param", {})}
    with postgres_database() as database_url, Gateway(name="audit-kill", env=env, database_url=database_url) as gateway:
        gateway.migrate()
        gateway.command("peer", "add", "fixture", "--url", fixture_url)
        gateway.auth_headers()
        yield gateway


def upstream_calls(fixture_url: str) -> int:
    """The `add` and `slow_echo` calls the upstream has started."""
    stats = json.loads(call_tool(fixture_url, "stats", {})["result"]["content"][0]["text"])
    return int(stats["add_calls"] + stats["slow_echo_calls"])


def audit_outcomes(gateway: Gateway) -> dict[str, int]:
    """Outcome -> rows of the `add` and `slow_echo` calls; "intents" -> intent rows left."""
    code = (
        "import json; from collections import Counter; from identity.models import AuditEvent, AuditIntent\n"
        f"rows = AuditEvent.objects.filter(method='tools/call', name__in={list(TOOLS)!r})\n"
        "print(json.dumps({**Counter(rows.values_list('outcome', flat=True)), 'intents': AuditIntent.objects.count()}))"
    )
    return json.loads(gateway.python(code).splitlines()[-1])


def accounted(gateway: Gateway, fixture_url: str) -> dict[str, int] | None:
    """The outcomes once every call the upstream started has its row and no intent is left, else None."""
    outcomes = audit_outcomes(gateway)
    rows = sum(n for outcome, n in outcomes.items() if outcome != "intents")
    return outcomes if outcomes["intents"] == 0 and rows == upstream_calls(fixture_url) else None


def start_two_workers(gateway: Gateway, env_a: dict[str, str]) -> tuple[Any, str]:
    """Worker A (with `env_a` on top), which the test kills, and worker B, which survives it."""
    common = dict(gateway.env)
    gateway.env.update(env_a)
    port_a = gateway.start_worker()
    gateway.env.clear()
    gateway.env.update(common)
    gateway.start_worker()
    return gateway.workers[0][0], f"http://127.0.0.1:{port_a}/mcp"


def test_answered_calls_whose_rows_were_still_queued_and_calls_in_flight_are_all_audited(gateway: Gateway, fixture_url: str) -> None:
    """The rows of answered calls wait in A's queue (its flush is minutes away) when A is killed."""
    worker_a, url = start_two_workers(gateway, {"FEDMCP_AUDIT_FLUSH_INTERVAL": "600"})
    headers = gateway.auth_headers()
    answered = 0
    for i in range(10):
        reply = call_tool(url, "fixture__add", {"a": i, "b": 1}, headers)
        assert reply["result"]["content"][0]["text"] == str(i + 1), reply
        answered += 1
    before = upstream_calls(fixture_url)
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(call_tool, url, "fixture__slow_echo", {"text": "x", "delay_ms": 25_000}, headers, BOUND) for _ in range(3)]
        wait_until(lambda: upstream_calls(fixture_url) == before + 3, timeout=BOUND, what="three slow calls running upstream")
        worker_a.send_signal(signal.SIGKILL)
        for call in slow:
            with pytest.raises(httpx.HTTPError):
                call.result(BOUND)
    assert worker_a.wait(BOUND) == -signal.SIGKILL

    outcomes = wait_until(lambda: accounted(gateway, fixture_url), timeout=BOUND, what="B's upkeep to write A's intents")

    # Every call the upstream started has its row; none could be completed by A, so all say so.
    assert outcomes == {"interrupted": answered + 3, "intents": 0}, outcomes
    assert upstream_calls(fixture_url) == answered + 3


def test_calls_racing_a_kill_leave_no_call_the_upstream_started_without_a_row(gateway: Gateway, fixture_url: str) -> None:
    """Hosts keep calling A (default flush) until it is killed mid-traffic."""
    worker_a, url = start_two_workers(gateway, {})
    headers = gateway.auth_headers()
    stop = threading.Event()
    seen: list[str] = []

    def host(n: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            tool = ("fixture__slow_echo", {"text": "x", "delay_ms": 300}) if i % 4 == n else ("fixture__add", {"a": i, "b": n})
            try:
                reply = call_tool(url, tool[0], tool[1], headers, BOUND)
            except httpx.HTTPError:
                return
            seen.append("ok" if "result" in reply else "error")

    hosts = [threading.Thread(target=host, args=(n,)) for n in range(4)]
    for thread in hosts:
        thread.start()
    wait_until(lambda: len(seen) >= 40, timeout=BOUND, what="forty calls answered")
    worker_a.send_signal(signal.SIGKILL)
    stop.set()
    for thread in hosts:
        thread.join(BOUND)
    assert worker_a.wait(BOUND) == -signal.SIGKILL

    def settled() -> dict[str, int] | None:
        outcomes = audit_outcomes(gateway)
        return outcomes if outcomes["intents"] == 0 else None

    outcomes = wait_until(settled, timeout=BOUND, what="B's upkeep to write A's intents")
    started = upstream_calls(fixture_url)
    rows = outcomes.get("ok", 0) + outcomes.get("interrupted", 0)

    assert set(outcomes) <= {"ok", "interrupted", "intents"} and "error" not in seen, (outcomes, seen)
    # No call the upstream started lacks a row. A row may stand for a call that never reached
    # the upstream: its intent was committed, then A died before sending it (one per host at most).
    assert started <= rows <= started + len(hosts), (started, outcomes)
    # Hosts saw at least the `ok` rows; the other answers they saw are among the `interrupted`.
    assert outcomes.get("ok", 0) <= len(seen) <= rows, (outcomes, len(seen))
