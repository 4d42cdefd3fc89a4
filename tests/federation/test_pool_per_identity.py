"""The upstream pool: one shared connection per peer, or one stdio process per identity, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os

from federation.pool import UpstreamPool
from federation.upstream.base import PeerConfig, modern_meta
from tests.e2e.harness import PY, ROOT


def stdio_peer(*, per_identity: bool, max_processes: int = 2) -> PeerConfig:
    return PeerConfig(
        id=7,
        name="local",
        transport="stdio",
        command=PY,
        args=("-m", "tests.fixtures.everything_server", "--stdio", "--name", "local"),
        env=(("PYTHONPATH", str(ROOT)),),
        connect_timeout=30,
        per_identity=per_identity,
        max_processes=max_processes,
    )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_shared_stdio_peer_serves_every_identity_from_one_process() -> None:
    async def scenario() -> tuple[int | None, int | None]:
        pool = UpstreamPool()
        try:
            alice = await pool.get(stdio_peer(per_identity=False), prefer="legacy", identity_key="user:1")
            bob = await pool.get(stdio_peer(per_identity=False), prefer="legacy", identity_key="user:2")
            return alice.pid, bob.pid  # type: ignore[attr-defined]
        finally:
            await pool.close()

    alice_pid, bob_pid = asyncio.run(asyncio.wait_for(scenario(), 60))

    assert alice_pid == bob_pid


def test_a_per_identity_peer_runs_one_process_per_user_and_stops_the_least_recently_used() -> None:
    peer = stdio_peer(per_identity=True, max_processes=2)

    async def scenario() -> dict[str, object]:
        pool = UpstreamPool()
        try:
            alice = await pool.get(peer, prefer="legacy", identity_key="user:1")
            bob = await pool.get(peer, prefer="legacy", identity_key="user:2")
            alice_again = await pool.get(peer, prefer="legacy", identity_key="user:1")
            carol = await pool.get(peer, prefer="legacy", identity_key="user:3")
            reply = await carol.request("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}, "_meta": modern_meta()})
            pids = {"alice": alice.pid, "bob": bob.pid, "carol": carol.pid}  # type: ignore[attr-defined]
            return {"pids": pids, "same_alice": alice is alice_again, "bob_closed": bob.closed, "count": len(pool.connections()), "reply": reply}
        finally:
            await pool.close()

    outcome = asyncio.run(asyncio.wait_for(scenario(), 90))
    pids = outcome["pids"]

    assert len(set(pids.values())) == 3  # type: ignore[union-attr]
    assert outcome["same_alice"] is True
    # Bob was the least recently used when Carol's process made three.
    assert outcome["bob_closed"] is True
    assert outcome["count"] == 2
    assert not process_alive(pids["bob"])  # type: ignore[index]
    assert "result" in outcome["reply"]  # type: ignore[operator]


def test_a_process_with_a_call_in_flight_is_not_stopped_to_make_room() -> None:
    peer = stdio_peer(per_identity=True, max_processes=1)

    async def scenario() -> dict[str, object]:
        pool = UpstreamPool()
        try:
            alice = await pool.get(peer, prefer="legacy", identity_key="user:1")
            params = {"name": "slow_echo", "arguments": {"text": "hi", "delay_ms": 60000}, "_meta": modern_meta()}
            call = asyncio.create_task(alice.request("tools/call", params))
            while not alice.in_flight:
                await asyncio.sleep(0.01)
            bob = await pool.get(peer, prefer="legacy", identity_key="user:2")
            during = {"alice_closed": alice.closed, "count": len(pool.connections())}
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            carol = await pool.get(peer, prefer="legacy", identity_key="user:3")
            after = {"alice_closed": alice.closed, "bob_closed": bob.closed, "carol_open": not carol.closed}
            return {"during": during, "after": after}
        finally:
            await pool.close()

    outcome = asyncio.run(asyncio.wait_for(scenario(), 90))

    # Alice's call kept her process past the bound; once idle, the least recently used go.
    assert outcome["during"] == {"alice_closed": False, "count": 2}
    assert outcome["after"] == {"alice_closed": True, "bob_closed": True, "carol_open": True}
