"""A peer's circuit closes as soon as the peer is back, and a stdio restart does not open it.

The breaker runs on a fake clock here: a probe is due 0.5 s after the circuit opens, then after
1, 2 and 3 s (the cap), never later, and the first good probe closes it. Failures that one death
of a stdio child caused count once.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from django.test import SimpleTestCase, override_settings

from federation import health
from federation.health import CircuitBreaker, CircuitOpenError, CircuitState
from federation.upstream.base import PeerConfig, UpstreamRestartingError, UpstreamUnavailableError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def opened(clock: FakeClock, failures: int = 5) -> CircuitBreaker:
    breaker = CircuitBreaker(failures, probe_cap=3.0, first_probe=0.5, clock=clock)
    for _ in range(failures):
        breaker.record_failure(UpstreamUnavailableError("refused"))
    assert breaker.state == CircuitState.OPEN
    return breaker


def refused(breaker: CircuitBreaker) -> bool:
    try:
        breaker.before_call("alpha")
    except CircuitOpenError:
        return True
    return False


class ProbeScheduleTests(SimpleTestCase):
    def test_probes_come_at_half_a_second_then_double_up_to_the_cap(self) -> None:
        clock = FakeClock()
        breaker = opened(clock)
        pauses = []
        for _ in range(6):
            waited = 0.0
            while refused(breaker):
                clock.advance(0.1)
                waited += 0.1
            pauses.append(round(waited, 1))
            breaker.record_failure(UpstreamUnavailableError("still refused"))  # the probe failed
        assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]

    def test_failures_while_open_never_push_the_next_probe_beyond_the_cap(self) -> None:
        clock = FakeClock()
        breaker = opened(clock)
        for _ in range(50):  # health checks and calls in flight failing during a long outage
            breaker.record_failure(UpstreamUnavailableError("refused"))
            clock.advance(0.2)
        clock.advance(3.0)
        assert not refused(breaker)

    def test_the_first_good_probe_closes_the_circuit(self) -> None:
        clock = FakeClock()
        breaker = opened(clock)
        clock.advance(0.5)
        assert not refused(breaker)  # this call is the probe
        assert refused(breaker)  # one probe at a time
        breaker.record_success()
        assert breaker.state == CircuitState.CLOSED
        assert not refused(breaker) and not refused(breaker)

    def test_a_peer_being_probed_stays_out_of_lists_until_the_probe_succeeds(self) -> None:
        breakers = health.Breakers()
        with override_settings(FEDERATION_BREAKER_FAILURES=1):
            breaker = breakers.for_peer(PEER)
        breaker.clock = FakeClock()
        breaker.record_failure(UpstreamUnavailableError("refused"))
        breaker.clock.advance(0.5)  # type: ignore[attr-defined]
        assert breaker.try_probe()
        assert PEER.id in breakers.open_peers()
        breaker.record_success()
        assert PEER.id not in breakers.open_peers()

    def test_a_refusal_says_when_the_next_probe_is_due(self) -> None:
        clock = FakeClock()
        breaker = opened(clock)
        with pytest.raises(CircuitOpenError, match=r"retries it in 0\.5s"):
            breaker.before_call("alpha")


class StdioRestartTests(SimpleTestCase):
    def test_calls_failed_by_one_restart_count_once(self) -> None:
        breaker = CircuitBreaker(5, probe_cap=3.0, clock=FakeClock())
        for _ in range(50):
            breaker.record_failure(UpstreamRestartingError("process exited", incident=(1, 4242)))
        assert (breaker.state, breaker.failures) == (CircuitState.CLOSED, 1)

    def test_a_child_that_keeps_dying_still_opens_the_circuit(self) -> None:
        breaker = CircuitBreaker(5, probe_cap=3.0, clock=FakeClock())
        for pid in range(5):
            breaker.record_failure(UpstreamRestartingError("process exited", incident=(1, pid)))
        assert breaker.state == CircuitState.OPEN


PEER = PeerConfig(id=987654, name="alpha", transport="streamable-http", url="http://127.0.0.1:9/mcp")


@override_settings(FEDERATION_BREAKER_FAILURES=2, FEDERATION_BREAKER_FIRST_PROBE=0.01, FEDERATION_BREAKER_COOLDOWN=0.05)
class WorkerProbeTests(SimpleTestCase):
    """Nobody calls the peer while its circuit is open: the worker probes it on its own."""

    def tearDown(self) -> None:
        health.breakers.forget(PEER.id)

    async def test_an_open_circuit_is_probed_until_the_peer_answers_then_closes(self) -> None:
        answers = iter([False, False, False, True])
        probes: list[float] = []

        async def fake_check(peer: PeerConfig) -> bool:
            probes.append(asyncio.get_running_loop().time())
            breaker = health.breakers.for_peer(peer)
            if next(answers):
                breaker.record_success()
                return True
            breaker.record_failure(UpstreamUnavailableError("refused"))
            return False

        breaker = health.breakers.for_peer(PEER)
        with mock.patch.object(health, "check_peer", fake_check), mock.patch.object(health, "_still_enabled", mock.AsyncMock(return_value=True)):
            breaker.record_failure(UpstreamUnavailableError("refused"))
            breaker.record_failure(UpstreamUnavailableError("refused"))
            assert breaker.state == CircuitState.OPEN
            async with asyncio.timeout(5):
                while breaker.state != CircuitState.CLOSED:
                    await asyncio.sleep(0.01)
        assert len(probes) == 4

    async def test_a_removed_peer_is_no_longer_probed(self) -> None:
        check = mock.AsyncMock(return_value=False)
        breaker = health.breakers.for_peer(PEER)
        with mock.patch.object(health, "check_peer", check), mock.patch.object(health, "_still_enabled", mock.AsyncMock(return_value=False)):
            breaker.record_failure(UpstreamUnavailableError("refused"))
            breaker.record_failure(UpstreamUnavailableError("refused"))
            # The prober finds the peer gone at its first look and forgets the breaker.
            async with asyncio.timeout(5):
                while PEER.id in health.breakers.states():
                    await asyncio.sleep(0.01)
        check.assert_not_called()
        assert PEER.id not in health.breakers.states()
