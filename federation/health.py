"""Per-peer circuit breakers and the health-check / refresh loop each worker runs.

A breaker is per peer and per worker: it opens after `FEDERATION_BREAKER_FAILURES` consecutive
transport failures (connect errors, timeouts, broken streams — not JSON-RPC errors the upstream
answers on purpose), rejects calls at once while open, lets one probe through after
`FEDERATION_BREAKER_COOLDOWN` seconds (half-open), and closes on the first success.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from federation.upstream.base import PeerConfig

logger = logging.getLogger(__name__)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpenError(Exception):
    """Calls to the peer are refused until its cooldown ends (message is safe for hosts)."""


@dataclass
class CircuitBreaker:
    failures_to_open: int
    cooldown: float
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = field(default=False)

    def before_call(self, peer_name: str) -> None:
        """Let a call through, or raise while the circuit is open.

        Raises:
            CircuitOpenError: the peer failed repeatedly and its cooldown has not ended.
        """
        if self.state == CircuitState.CLOSED:
            return
        now = time.monotonic()
        if self.state == CircuitState.OPEN and now - self.opened_at >= self.cooldown:
            self.state = CircuitState.HALF_OPEN
            self.probing = False
        if self.state == CircuitState.HALF_OPEN and not self.probing:
            self.probing = True
            return
        retry_in = max(0.0, self.cooldown - (now - self.opened_at))
        raise CircuitOpenError(
            f"peer '{peer_name}' is unavailable after {self.failures} consecutive failures; "
            f"the gateway retries it in {retry_in:.0f}s"
        )

    def record_success(self) -> None:
        self.state, self.failures, self.probing = CircuitState.CLOSED, 0, False

    def record_failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.state == CircuitState.HALF_OPEN or self.failures >= self.failures_to_open:
            if self.state != CircuitState.OPEN:
                logger.warning("circuit opened after %d failures", self.failures)
            self.state = CircuitState.OPEN
            self.opened_at = time.monotonic()


class Breakers:
    """This worker's breakers, one per peer id."""

    def __init__(self) -> None:
        self._by_peer: dict[int, CircuitBreaker] = {}

    def for_peer(self, peer: PeerConfig) -> CircuitBreaker:
        breaker = self._by_peer.get(peer.id)
        if breaker is None:
            breaker = CircuitBreaker(settings.FEDERATION_BREAKER_FAILURES, settings.FEDERATION_BREAKER_COOLDOWN)
            self._by_peer[peer.id] = breaker
        return breaker

    def states(self) -> dict[int, CircuitState]:
        return {peer_id: b.state for peer_id, b in self._by_peer.items()}

    def open_peers(self) -> frozenset[int]:
        """Peers whose circuit is open: their items are left out of list results."""
        return frozenset(peer_id for peer_id, b in self._by_peer.items() if b.state == CircuitState.OPEN)


breakers = Breakers()


@database_sync_to_async
def _record_check(peer_id: int, ok: bool, latency_ms: float | None, error: str) -> None:
    from federation.models import PeerHealthCheck

    PeerHealthCheck.objects.create(peer_id=peer_id, ok=ok, latency_ms=latency_ms, error=error[:1000])
    keep = settings.FEDERATION_HEALTH_HISTORY
    stale = PeerHealthCheck.objects.filter(peer_id=peer_id).order_by("-checked_at").values_list("pk", flat=True)[keep:]
    PeerHealthCheck.objects.filter(pk__in=list(stale)).delete()


async def check_peer(peer: PeerConfig) -> bool:
    """Probe one peer (ping in the handshake era, server/discover in 2026-07-28) and record it."""
    from federation.pool import pool
    from federation.upstream.base import UpstreamError, modern_meta
    from identity.upstream_oauth import UpstreamAuthorizationRequiredError

    breaker = breakers.for_peer(peer)
    started = time.monotonic()
    try:
        connection = await pool.get(peer, prefer="modern")
        if connection.era == "modern":
            reply = await connection.request("server/discover", {"_meta": modern_meta()}, timeout=peer.connect_timeout)
        else:
            reply = await connection.request("ping", None, timeout=peer.connect_timeout)
        if "error" in reply:
            raise UpstreamError(f"health probe answered an error: {reply['error'].get('message', '')}")
    except UpstreamAuthorizationRequiredError as exc:
        # Nobody has connected an account at a per-user OAuth peer yet: nothing is known about
        # it, and that is no transport failure to open the circuit for.
        await _record_check(peer.id, False, None, str(exc))
        return False
    except (UpstreamError, OSError) as exc:
        breaker.record_failure()
        await _record_check(peer.id, False, None, str(exc))
        return False
    except Exception as exc:
        # Anything else is a failed probe too, recorded and logged in full, never lost in the loop.
        logger.exception("peer %s: health probe failed unexpectedly", peer.name)
        breaker.record_failure()
        await _record_check(peer.id, False, None, f"{type(exc).__name__}: {exc}")
        return False
    latency = (time.monotonic() - started) * 1000
    breaker.record_success()
    await _record_check(peer.id, True, latency, "")
    return True


@database_sync_to_async
def _enabled_peers() -> list[PeerConfig]:
    from federation.models import Peer
    from federation.router import peer_config

    # As routes build them, so the pool keeps one connection per peer (federation/pool.py).
    return [peer_config(p) for p in Peer.objects.enabled()]


async def refresh_peer(peer: PeerConfig) -> None:
    """Re-sync one peer's catalog on its warm connection and tell hosts what changed."""
    from federation.events import _load_peer, publish_catalog_changed
    from federation.pool import pool
    from federation.services import peer_sync_catalog
    from federation.upstream.base import UpstreamError

    row = await _load_peer(peer.id)
    if row is None:
        return
    try:
        connection = await pool.get(peer, prefer="modern")
    except UpstreamError as exc:
        logger.info("peer %s: refresh skipped: %s", peer.name, exc)
        return
    report = await peer_sync_catalog(peer=row, connection=connection)
    if report.changed:
        await publish_catalog_changed(peer.name, report.changed)


async def _every(interval: float, job: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            peers = await _enabled_peers()
            results = await asyncio.gather(*(job(p) for p in peers), return_exceptions=True)
            for peer, result in zip(peers, results, strict=True):
                if isinstance(result, Exception):
                    logger.error("peer %s: periodic %s failed: %r", peer.name, getattr(job, "__name__", "job"), result)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("periodic %s round failed", getattr(job, "__name__", "job"))


_started: dict[int, list[asyncio.Task[None]]] = {}


def ensure_background_tasks() -> None:
    """Start this worker's health-check and refresh loops once per event loop (0 = disabled)."""
    loop = asyncio.get_running_loop()
    if id(loop) in _started:
        return
    tasks = []
    if settings.FEDERATION_HEALTH_INTERVAL > 0:
        tasks.append(loop.create_task(_every(settings.FEDERATION_HEALTH_INTERVAL, check_peer)))
    if settings.FEDERATION_REFRESH_INTERVAL > 0:
        tasks.append(loop.create_task(_every(settings.FEDERATION_REFRESH_INTERVAL, refresh_peer)))
    _started[id(loop)] = tasks
