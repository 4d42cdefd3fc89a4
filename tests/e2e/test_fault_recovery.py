"""A peer that comes back is used again within seconds, with the product's default settings.

Real daphne worker, real upstreams: an HTTP fixture process stopped long enough for its circuit
to open and its probes to back off to their cap, then started again on the same port; and the
gateway's stdio child SIGKILLed while hosts keep calling it.

* The HTTP peer's tools are listed again within `RECOVERY_BOUND` seconds of its return, with no
  host calling it (only the worker's own probes can have closed the circuit), far below the
  30 s health interval.
* The stdio peer's restart (the gateway's own doing, well under a second) never opens its
  circuit: no call is refused with "unavailable after N consecutive failures".
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from mcp_endpoint import jsonrpc
from tests.e2e.conftest import stdio_fixture_command
from tests.e2e.harness import ROOT, Gateway, migrated_gateway
from tests.e2e.test_fault_isolation import (  # noqa: F401  (fixtures)
    FixtureUpstream,
    add,
    child_pids,
    host_session,
    tool_names,
    tools_of,
    upstream_error,
    upstreams,
    worker_pid,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

RECOVERY_BOUND = 5.0
"""Seconds from the upstream's return until the gateway lists its tools again."""
OUTAGE = 8.0
"""Long enough for the probes' pause to reach its cap (0.5 + 1 + 2 + 3 s)."""
WAIT = 20.0
POLL = 0.1
CIRCUIT_OPEN = "consecutive failures"


@pytest.fixture
def default_gateway(request: pytest.FixtureRequest, upstreams: Callable[[str], FixtureUpstream]) -> Iterator[Gateway]:
    """A migrated gateway with default fault settings (stopped before the upstreams are)."""
    with migrated_gateway(request, name="recovery") as gw:
        yield gw


async def test_an_http_upstream_that_comes_back_is_listed_again_within_seconds(
    default_gateway: Gateway, upstreams: Callable[[str], FixtureUpstream]
) -> None:
    alpha = upstreams("alpha")
    default_gateway.command("peer", "add", "alpha", "--url", alpha.url, "--call-timeout", "3", "--connect-timeout", "2")
    default_gateway.start_worker()

    async with host_session(default_gateway) as client:
        assert await add(client, "alpha", 1, 2) == "3"
        await anyio.to_thread.run_sync(alpha.kill)

        # Calls fail until the circuit opens (5 failures by default) and alpha leaves the list.
        with anyio.fail_after(WAIT):
            while CIRCUIT_OPEN not in (await upstream_error(client, "alpha__add", {"a": 1, "b": 1})).message:
                pass
        assert not tools_of("alpha") & await tool_names(client)
        await anyio.sleep(OUTAGE)

        await anyio.to_thread.run_sync(alpha.start)
        back = time.monotonic()
        with anyio.fail_after(WAIT):
            while not tools_of("alpha") <= await tool_names(client):
                await anyio.sleep(POLL)
        recovered_in = time.monotonic() - back
        assert recovered_in < RECOVERY_BOUND, f"alpha's circuit closed {recovered_in:.1f}s after it came back"
        assert await add(client, "alpha", 20, 22) == "42"


async def test_a_killed_stdio_child_does_not_open_its_circuit(default_gateway: Gateway) -> None:
    default_gateway.manage(
        "peer", "add", "local", "--command", stdio_fixture_command("local"), "--env", f"PYTHONPATH={ROOT}",
        "--call-timeout", "10", "--connect-timeout", "10",
    )
    default_gateway.start_worker()
    worker = worker_pid(default_gateway)

    async with host_session(default_gateway) as client:
        assert await add(client, "local", 1, 2) == "3"
        [child] = child_pids(worker)
        errors: list[str] = []
        successes = 0

        async def lane(offset: int) -> None:
            # Keep calling through the death and the restart, until this lane has had 5 answers.
            nonlocal successes
            answered = 0
            i = offset
            while answered < 5:
                try:
                    assert await add(client, "local", i, 1000) == str(i + 1000)
                    answered += 1
                    successes += 1
                except MCPError as exc:
                    assert exc.code == jsonrpc.UPSTREAM_ERROR, exc.message
                    errors.append(exc.message)
                    await anyio.sleep(0.02)
                i += 4

        os.kill(child, signal.SIGKILL)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for offset in range(4):
                    group.start_soon(lane, offset)

        refused = [e for e in errors if CIRCUIT_OPEN in e]
        assert not refused, f"{len(refused)} calls refused by an open circuit; all errors: {errors}"
        assert successes == 20
        assert child not in child_pids(worker)
