"""Per-peer circuit breakers and health probes (the loops that run them: federation/upkeep.py).

A breaker is per peer and per worker: it opens after `FEDERATION_BREAKER_FAILURES` consecutive
transport failures (connect errors, timeouts, broken streams — not JSON-RPC errors the upstream
answers on purpose) and rejects calls at once while open. While it is open the worker probes the
peer itself, first after `FEDERATION_BREAKER_FIRST_PROBE` seconds, then doubling up to
`FEDERATION_BREAKER_COOLDOWN`, and closes it on the first good probe: a peer that comes back is
used again within a few seconds, whether or not a host is calling it. A call arriving when a probe
is due is let through as that probe (half-open).

Calls that fail because the gateway is restarting the peer's stdio process count once per
restart, however many were in flight: the restart is the gateway's doing, and the process is
usually back in under a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from channels.db import database_sync_to_async
from django.conf import settings
from prometheus_client.core import GaugeMetricFamily

from federation.upstream.base import PeerConfig, UpstreamRestartingError

logger = logging.getLogger(__name__)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpenError(Exception):
    """Calls to the peer are refused until a probe succeeds (message is safe for hosts)."""


@dataclass
class CircuitBreaker:
    failures_to_open: int
    probe_cap: float
    """Longest pause between two probes of an open circuit (seconds)."""
    first_probe: float = 0.5
    """Pause before the first probe after the circuit opens; it doubles after each failed probe."""
    clock: Callable[[], float] = time.monotonic
    on_open: Callable[[], None] | None = field(default=None, repr=False)
    """Called when the circuit opens (the worker starts probing the peer)."""
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    probe_delay: float = 0.0
    next_probe_at: float = 0.0
    probing: bool = False
    last_incident: object = field(default=None, repr=False)

    def before_call(self, peer_name: str) -> None:
        """Let a call through, or raise while the circuit is open.

        Raises:
            CircuitOpenError: the peer failed repeatedly and no probe is due yet.
        """
        if self.state == CircuitState.CLOSED or self.try_probe():
            return
        retry_in = max(0.0, self.next_probe_at - self.clock())
        raise CircuitOpenError(
            f"peer '{peer_name}' is unavailable after {self.failures} consecutive failures; "
            f"the gateway retries it in {retry_in:.1f}s"
        )

    def try_probe(self) -> bool:
        """Claim the one probe an open circuit allows once its pause is over; False if none is due."""
        if self.state == CircuitState.OPEN and self.clock() >= self.next_probe_at:
            self.state, self.probing = CircuitState.HALF_OPEN, False
        if self.state == CircuitState.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def release_probe(self) -> None:
        """Give back a claimed probe that ended with neither success nor failure."""
        self.probing = False

    def record_success(self) -> None:
        if self.state != CircuitState.CLOSED:
            logger.warning("circuit closed after a good probe")
        self.state, self.failures, self.probing, self.probe_delay = CircuitState.CLOSED, 0, False, 0.0

    def record_failure(self, error: BaseException | None = None) -> None:
        """Count one transport failure; `error` lets failures of one stdio restart count once."""
        if isinstance(error, UpstreamRestartingError):
            if error.incident == self.last_incident:
                return
            self.last_incident = error.incident
        self.failures += 1
        self.probing = False
        if self.state == CircuitState.CLOSED:
            if self.failures < self.failures_to_open:
                return
            logger.warning("circuit opened after %d failures", self.failures)
            self.state, self.probe_delay = CircuitState.OPEN, self.first_probe
            self.next_probe_at = self.clock() + self.probe_delay
            if self.on_open is not None:
                self.on_open()
            return
        # A failed probe (or a call that was already in flight): wait longer, never beyond the cap.
        self.state = CircuitState.OPEN
        self.probe_delay = min(max(self.probe_delay, self.first_probe) * 2, self.probe_cap)
        self.next_probe_at = self.clock() + self.probe_delay


class Breakers:
    """This worker's breakers, one per peer id, and the probes of the open ones."""

    def __init__(self) -> None:
        self._by_peer: dict[int, CircuitBreaker] = {}
        self._peers: dict[int, PeerConfig] = {}
        self._probes: dict[int, asyncio.Task[None]] = {}

    def for_peer(self, peer: PeerConfig) -> CircuitBreaker:
        self._peers[peer.id] = peer  # the newest configuration is the one to probe
        breaker = self._by_peer.get(peer.id)
        if breaker is None:
            breaker = CircuitBreaker(
                settings.FEDERATION_BREAKER_FAILURES,
                settings.FEDERATION_BREAKER_COOLDOWN,
                first_probe=min(settings.FEDERATION_BREAKER_FIRST_PROBE, settings.FEDERATION_BREAKER_COOLDOWN),
            )
            breaker.on_open = lambda peer_id=peer.id: self._start_probing(peer_id)
            self._by_peer[peer.id] = breaker
        return breaker

    def states(self) -> dict[int, CircuitState]:
        return {peer_id: b.state for peer_id, b in self._by_peer.items()}

    def open_peers(self) -> frozenset[int]:
        """Peers whose circuit is not closed: their items are left out of list results.

        Half-open counts: the worker probes open circuits every few seconds, and a probe of an
        unreachable host may last the connect timeout; the items come back once a probe succeeds.
        """
        return frozenset(peer_id for peer_id, b in self._by_peer.items() if b.state != CircuitState.CLOSED)

    def forget(self, peer_id: int) -> None:
        """Drop a removed or disabled peer's breaker and stop probing it."""
        self._by_peer.pop(peer_id, None)
        self._peers.pop(peer_id, None)
        task = self._probes.pop(peer_id, None)
        if task is not None:
            task.cancel()

    def _start_probing(self, peer_id: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a management command's sync code): calls still probe when due
        task = self._probes.get(peer_id)
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._probes[peer_id] = loop.create_task(self._probe_until_closed(peer_id))

    async def _probe_until_closed(self, peer_id: int) -> None:
        """Probe an open circuit's peer on the breaker's schedule until a probe succeeds."""
        while (breaker := self._by_peer.get(peer_id)) is not None and breaker.state != CircuitState.CLOSED:
            await asyncio.sleep(max(0.05, breaker.next_probe_at - breaker.clock()))
            peer = self._peers.get(peer_id)
            if peer is None or not await _still_enabled(peer_id):
                self.forget(peer_id)  # removed or disabled meanwhile: nothing to probe
                return
            if not breaker.try_probe():
                continue  # a host call is the probe right now; look again after its pause
            try:
                await check_peer(peer)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("peer %s: probe failed unexpectedly", peer.name)
            finally:
                if breaker.probing:
                    breaker.release_probe()


breakers = Breakers()


@database_sync_to_async
def _peer_is_enabled(peer_id: int) -> bool:
    from federation.models import Peer

    return Peer.objects.enabled().filter(pk=peer_id).exists()


async def _still_enabled(peer_id: int) -> bool:
    """Whether the peer is still configured; with the database unreachable, assume it is."""
    from django.db import Error as DatabaseError

    try:
        return await _peer_is_enabled(peer_id)
    except DatabaseError:
        return True


@database_sync_to_async
def record_check(peer_id: int, ok: bool, latency_ms: float | None, error: str) -> None:
    from federation.models import PeerHealthCheck

    PeerHealthCheck.objects.create(peer_id=peer_id, ok=ok, latency_ms=latency_ms, error=error[:1000])
    keep = settings.FEDERATION_HEALTH_HISTORY
    stale = PeerHealthCheck.objects.filter(peer_id=peer_id).order_by("-checked_at").values_list("pk", flat=True)[keep:]
    PeerHealthCheck.objects.filter(pk__in=list(stale)).delete()


async def check_peer(peer: PeerConfig) -> bool:
    """Probe one peer (ping in the handshake era, server/discover in 2026-07-28) and record it."""
    from federation.pool import pool
    from federation.upstream.base import UpstreamError
    from federation.upstream_oauth import UpstreamAuthorizationRequiredError

    breaker = breakers.for_peer(peer)
    started = time.monotonic()
    try:
        connection = await pool.get(peer, prefer="modern")
        await connection.probe()
    except UpstreamAuthorizationRequiredError as exc:
        # Nobody has connected an account at a per-user OAuth peer yet: nothing is known about
        # it, and that is no transport failure to open the circuit for.
        await record_check(peer.id, False, None, str(exc))
        return False
    except (UpstreamError, OSError) as exc:
        breaker.record_failure(exc)
        await record_check(peer.id, False, None, str(exc))
        return False
    except Exception as exc:
        # Anything else is a failed probe too, recorded and logged in full, never lost in the loop.
        logger.exception("peer %s: health probe failed unexpectedly", peer.name)
        breaker.record_failure()
        await record_check(peer.id, False, None, f"{type(exc).__name__}: {exc}")
        return False
    latency = (time.monotonic() - started) * 1000
    breaker.record_success()
    await record_check(peer.id, True, latency, "")
    return True


def circuit_states_metric() -> Iterable[GaugeMetricFamily]:
    """`fedmcp_circuit_state` at scrape time (registered in FederationConfig.ready)."""
    from federation.models import Peer

    family = GaugeMetricFamily(
        "fedmcp_circuit_state",
        "Circuit breaker of each enabled peer on this worker: 1 for its current state.",
        labels=["peer", "state"],
    )
    states = breakers.states()
    for peer_id, name in Peer.objects.enabled().values_list("id", "name"):
        current = states.get(peer_id, CircuitState.CLOSED)
        for state in CircuitState:
            family.add_metric([name, state.value], 1.0 if state == current else 0.0)
    yield family

