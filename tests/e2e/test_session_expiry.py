"""WebSocket and SSE sessions of a worker that is killed or drained do not stay open.

Real daphne workers with a 3 s session lease (FEDMCP_SESSION_LEASE). A host opens a WebSocket
and a legacy SSE stream on worker A, then:

* A is SIGKILLed: nothing on A can close the sessions, so worker B's upkeep must, once their
  leases run out;
* A gets SIGTERM (a clean drain): A closes them itself before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect
from websockets.typing import Origin, Subprotocol

from tests.e2e.harness import Gateway, migrated_gateway, wait_until

pytestmark = [pytest.mark.e2e]

LEASE = 3
BOUND = 6 * LEASE
"""Seconds for another worker to notice: the lease, plus an upkeep round (a third of it), plus slack."""


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    with migrated_gateway(request, name="leases", env={"FEDMCP_SESSION_LEASE": str(LEASE)}) as gw:
        yield gw


def open_sessions(gw: Gateway) -> dict[str, int]:
    """Open WebSocket and SSE session rows, by transport."""
    code = (
        "import json; from mcp_endpoint.models import McpSession as S;"
        "print(json.dumps({t: S.objects.live().filter(transport=t).count() for t in ('websocket', 'sse')}))"
    )
    return json.loads(gw.python(code).splitlines()[-1])


class Streams:
    """A WebSocket and a legacy SSE stream held open on one worker (each on its own thread)."""

    def __init__(self, gw: Gateway, worker: int = 0) -> None:
        headers = gw.auth_headers()
        self.ws = connect(gw.ws_url("/ws", worker), subprotocols=[Subprotocol("mcp")], origin=Origin(gw.public_url), additional_headers=headers)
        self.sse_open = threading.Event()
        self._sse = threading.Thread(target=self._hold_sse, args=(gw.url("/sse", worker), headers), daemon=True)
        self._sse.start()
        assert self.sse_open.wait(20), "the SSE stream did not open"

    def _hold_sse(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(5, read=None)) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    self.sse_open.set()
        except httpx.HTTPError:
            pass  # the worker went away

    def close(self) -> None:
        self.ws.close()
        self._sse.join(10)


def test_sessions_of_a_killed_worker_are_closed_by_another_worker(gateway: Gateway) -> None:
    gateway.start_worker()
    streams = Streams(gateway)
    assert open_sessions(gateway) == {"websocket": 1, "sse": 1}

    a = gateway.workers[0][0]
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    streams.close()
    gateway.start_worker()  # B: its upkeep runs every LEASE / 3 seconds

    wait_until(lambda: open_sessions(gateway) == {"websocket": 0, "sse": 0}, timeout=BOUND, what="the dead worker's sessions to close")


def test_a_draining_worker_closes_its_sessions_before_it_exits(gateway: Gateway) -> None:
    gateway.start_worker()
    streams = Streams(gateway)
    assert open_sessions(gateway) == {"websocket": 1, "sse": 1}

    a = gateway.workers[0][0]
    a.send_signal(signal.SIGTERM)
    a.wait(60)
    streams.close()

    # No other worker runs: only A itself can have closed them.
    assert open_sessions(gateway) == {"websocket": 0, "sse": 0}
