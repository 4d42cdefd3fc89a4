"""Prometheus metrics of one worker, served at /metrics.

Each daphne worker is its own process with its own registry and serves its own /metrics;
Prometheus scrapes every worker (docs/DEPLOYMENT.md). prometheus-client's multiprocess mode
is for forked workers behind one port and is not used.

Per-worker series: forwarded calls, their latency and outcome, calls in flight, open host
streams, circuit states, rate-limit hits. Cluster-wide series read from the database at scrape
time (every worker reports the same value; aggregate with max, not sum): host sessions.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from django.conf import settings
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedmcp_lib import observability

logger = logging.getLogger(__name__)
call_logger = logging.getLogger("fedmcp.calls")

# `*_created` series double the series count and nothing here needs them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds: from a local stdio tool (milliseconds) to a long upstream call."""

FORWARDED_CALLS = Counter(
    "fedmcp_forwarded_calls",
    "Requests forwarded to upstream peers, by outcome: ok, error (an error answered by the upstream "
    "or the gateway), unavailable (transport failure or timeout), circuit_open, rate_limited, "
    "cancelled, internal.",
    ["peer", "method", "outcome"],
)
FORWARDED_CALL_SECONDS = Histogram(
    "fedmcp_forwarded_call_duration_seconds",
    "Time to answer a forwarded request, for calls that reached the upstream (not refused by a "
    "rate limit or an open circuit).",
    ["peer", "method"],
    buckets=LATENCY_BUCKETS,
)
FORWARDED_IN_FLIGHT = Gauge("fedmcp_forwarded_calls_in_flight", "Forwarded requests running on this worker.", ["peer"])
OPEN_STREAMS = Gauge(
    "fedmcp_open_streams",
    "Host streams held open by this worker: WebSocket connections, legacy SSE streams, Streamable HTTP GET streams.",
    ["transport"],
)
RATE_LIMITED = Counter(
    "fedmcp_rate_limited",
    "Forwarded requests refused by a rate limit, by the limit that refused them (identity or peer).",
    ["scope", "peer"],
)
RATE_LIMIT_BACKEND_ERRORS = Counter(
    "fedmcp_rate_limit_backend_errors",
    "Rate-limit checks that could not reach Redis (the call was let through).",
)
DRAINING = Gauge("fedmcp_draining", "1 while this worker drains in-flight requests before shutting down.")
COMPONENT_UP = Gauge(
    "fedmcp_component_up",
    "1 when a component this worker depends on (database, channel_layer) answered its last /readyz check, 0 when not.",
    ["component"],
)

OUTCOME_UNREACHED = frozenset({"rate_limited", "circuit_open"})
"""Outcomes of calls refused before the upstream was tried: kept out of the latency histogram."""

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


_children: dict[tuple[Any, ...], Any] = {}
"""(metric, label values) -> the metric's child: `labels()` validates and locks on every call."""


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def instrument_forward(classify: Callable[[Exception], str]) -> Callable[[F], F]:
    """Count, time and log each call of a forward(ctx, route, method, params) (mcp_endpoint/pipeline/flow.py).

    `classify` names the outcome of an exception it raised (mcp_endpoint/pipeline/record.py `metric_outcome`).
    """

    def decorate(forward: F) -> F:
        return _instrumented(forward, classify)

    return decorate


def _instrumented(forward: F, classify: Callable[[Exception], str]) -> F:
    @functools.wraps(forward)
    async def instrumented(ctx: Any, route: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        peer = route.peer.name
        in_flight = _child(FORWARDED_IN_FLIGHT, peer)
        outcome = "ok"
        started = time.perf_counter()
        in_flight.inc()
        try:
            with observability.peer_scope(peer):
                return await forward(ctx, route, method, *args, **kwargs)
        except BaseException as exc:
            outcome = classify(exc) if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            elapsed = time.perf_counter() - started
            in_flight.dec()
            _child(FORWARDED_CALLS, peer, method, outcome).inc()
            if outcome not in OUTCOME_UNREACHED:
                _child(FORWARDED_CALL_SECONDS, peer, method).observe(elapsed)
            # The line's fields are computed only when someone will read it.
            if settings.FEDMCP_CALL_LOG and call_logger.isEnabledFor(logging.INFO):
                with observability.peer_scope(peer):
                    call_logger.info(
                        "%s to %s: %s in %.1f ms", method, peer, outcome, elapsed * 1000,
                        extra={"outcome": outcome, "duration_ms": round(elapsed * 1000, 3)},
                    )

    return instrumented  # type: ignore[return-value]


class stream_open:  # noqa: N801 - used like a function: `async with stream_open("sse"), ...`
    """Count a host stream as open on this worker while the block runs (`with` or `async with`)."""

    def __init__(self, transport: str) -> None:
        self._gauge = OPEN_STREAMS.labels(transport)

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *exc_info: object) -> None:
        self._gauge.dec()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()


# --- read at scrape time -------------------------------------------------------------------------

ScrapeSource = Callable[[], Iterable[GaugeMetricFamily]]
_sources: dict[str, ScrapeSource] = {}


def register_scrape(name: str, source: ScrapeSource | None) -> None:
    """Export the series `name` from `source()`, called at every scrape (None: stop).

    Each app registers what it knows in its AppConfig.ready(): host sessions (mcp_endpoint),
    circuit states (federation), pending consent prompts (identity). A series nobody
    registered is not exported at all, rather than reporting a made-up 0.
    """
    if source is None:
        _sources.pop(name, None)
    else:
        _sources[name] = source


class ScrapeTimeCollector(Collector):
    """Series computed when Prometheus scrapes, from the registered sources."""

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Without this the registry calls collect() on registration: database queries at import.
        return [GaugeMetricFamily(name, "") for name in _sources]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, source in list(_sources.items()):
            # A scrape must not fail because the database is down: /readyz says that.
            try:
                yield from list(source())
            except Exception:
                logger.warning("metrics: could not read %s", name, exc_info=True)


_collector = ScrapeTimeCollector()
REGISTRY.register(_collector)


def scrape_allowed(remote_addr: str | None) -> bool:
    """Whether a client at `remote_addr` may read /metrics (FEDMCP_METRICS_ALLOWED_NETWORKS)."""
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    return any(address in network for network in _allowed_networks(tuple(settings.FEDMCP_METRICS_ALLOWED_NETWORKS)))


@functools.lru_cache(maxsize=4)
def _allowed_networks(networks: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)
