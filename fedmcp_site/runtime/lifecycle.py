"""Readiness checks and the graceful shutdown of a daphne worker.

What daphne does on its own (daphne 4.2, `daphne/server.py`): Twisted's SIGTERM handler stops
the reactor; daphne's "before shutdown" trigger `kill_all_applications` cancels every running
application instance at once, and the reactor then drops every connection. Nothing waits for
requests in progress; `--application-close-timeout` only bounds how long an application may
keep running after *its client* disconnected. Worse for a gateway: cancelling a Channels
consumer does not cancel the tasks it started (our HTTP consumers answer in a task, WebSocket
and legacy SSE messages too), so upstream calls are cut off mid-flight when the process exits,
without `notifications/cancelled`, and upstream sessions are never closed.

`install()` (called from asgi.py) changes that when the worker runs under daphne:

1. On the first SIGTERM the worker drains, still listening: /readyz answers 503 (a balancer's
   probe sees "not ready", not "connection refused"), idle keep-alive connections are closed and
   every response carries `Connection: close` (fedmcp_site/runtime/request_guard.py), so a
   balancer stops reusing connections to it. It stops listening once nothing is in flight and no
   request (other than a probe) has arrived for `FEDMCP_DRAIN_QUIET` seconds — the balancer has
   noticed — or at the latest `FEDMCP_DRAIN_LISTEN` seconds after the SIGTERM (a balancer without
   active health checks never notices; it then gets "connection refused" and tries another
   worker); requests in progress get until `FEDMCP_SHUTDOWN_GRACE` seconds to finish.
2. Then the reactor stops as before. Before daphne's connections are dropped, the requests still
   running are cancelled (the pipeline sends the upstream its cancellation) and the upstream pool
   is closed (upstream sessions end, stdio children exit).

A second SIGTERM skips the rest of the grace period.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from fedmcp_lib import metrics, observability

TARGETS = {"daphne": "4.2.3", "twisted": "26.10.0", "channels": "4.3.2"}
"""The versions this module was written against (tests/architecture/test_runtime_patches.py)."""

logger = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0
"""Seconds cancelled requests get to tell their upstreams before the pool is closed."""
REPLY_SETTLE_SECONDS = 0.5
"""Pause after the last request finished: a legacy SSE reply still travels through the channel
layer to its stream, and response bytes still sit in socket buffers."""
FLUSH_TIMEOUT = 2.0


@dataclass
class _State:
    draining: bool = False
    migrations_applied: bool = False
    drain_task: asyncio.Task[None] | None = None


state = _State()


# --- readiness -----------------------------------------------------------------------------------


def _failure(exc: BaseException) -> dict[str, Any]:
    # The class name tells an operator where to look; the message (hosts, paths) stays in the log.
    return {"ok": False, "error": type(exc).__name__}


def _unapplied_migrations() -> int:
    executor = MigrationExecutor(connection)
    return len(executor.migration_plan(executor.loader.graph.leaf_nodes()))


@database_sync_to_async
def _database_checks() -> dict[str, dict[str, Any]]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("readiness: database unreachable", exc_info=True)
        return {"database": _failure(exc), "migrations": {"ok": False, "error": "database unreachable"}}
    checks: dict[str, dict[str, Any]] = {"database": {"ok": True}}
    if not state.migrations_applied:
        # This code's migrations, once applied, stay applied: check until they are, then stop paying.
        try:
            unapplied = _unapplied_migrations()
        except Exception as exc:
            logger.warning("readiness: could not read the migration state", exc_info=True)
            checks["migrations"] = _failure(exc)
            return checks
        state.migrations_applied = unapplied == 0
        if unapplied:
            checks["migrations"] = {"ok": False, "error": f"{unapplied} unapplied migrations"}
            return checks
    checks["migrations"] = {"ok": True}
    return checks


async def _channel_layer_check() -> dict[str, Any]:
    """Send a message to a fresh channel of this worker and read it back (a Redis round trip)."""
    layer = get_channel_layer()
    backend = "redis" if "redis" in type(layer).__module__ else type(layer).__name__
    nonce = uuid.uuid4().hex
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "fedmcp.readyz", "nonce": nonce})
        message = await layer.receive(channel)
    except Exception as exc:
        logger.warning("readiness: channel layer unreachable", exc_info=True)
        return {**_failure(exc), "backend": backend}
    if message.get("nonce") != nonce:
        return {"ok": False, "error": "wrong message", "backend": backend}
    return {"ok": True, "backend": backend}


async def _bounded(check: Any, timeout: float, fallback: dict[str, Any]) -> Any:
    try:
        return await asyncio.wait_for(check, timeout)
    except TimeoutError:
        return fallback


REQUIRED_CHECKS = ("database", "migrations")
"""Without these the worker cannot serve: every request reads tokens, sessions or grants."""
DEGRADING_CHECKS = ("channelLayer",)
"""Without these the worker still serves Streamable HTTP and WebSocket calls; what needs them
(legacy SSE replies across workers, cancellation and list_changed across workers) fails with a
clear error. Every worker shares them, so failing readiness would only empty the pool."""


async def readiness() -> tuple[bool, dict[str, Any]]:
    """Return whether this worker can serve, and the report /readyz answers.

    Ready unless draining or a required check fails; a failed degrading check leaves the
    worker ready with `status: degraded` and names it in `degraded`. Each component's state
    is also the `fedmcp_component_up` metric.
    """
    timeout = settings.FEDMCP_READYZ_TIMEOUT
    database, channel_layer = await asyncio.gather(
        _bounded(_database_checks(), timeout, {"database": {"ok": False, "error": "timeout"}, "migrations": {"ok": False, "error": "timeout"}}),
        _bounded(_channel_layer_check(), timeout, {"ok": False, "error": "timeout"}),
    )
    checks = {**database, "channelLayer": channel_layer}
    metrics.COMPONENT_UP.labels("database").set(1 if checks["database"]["ok"] else 0)
    metrics.COMPONENT_UP.labels("channel_layer").set(1 if checks["channelLayer"]["ok"] else 0)
    ready = all(checks[name]["ok"] for name in REQUIRED_CHECKS) and not state.draining
    degraded = [name for name in DEGRADING_CHECKS if not checks[name]["ok"]]
    status = "unavailable" if not ready else "degraded" if degraded else "ready"
    report = {"status": status, "draining": state.draining, "degraded": degraded, "checks": checks}
    return ready, report


# --- graceful shutdown -----------------------------------------------------------------------------


def install() -> None:
    """Drain on SIGTERM and release upstreams on shutdown, when running under daphne."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    reactor.callWhenRunning(_take_over_sigterm, reactor)
    reactor.callWhenRunning(_start_upkeep)
    reactor.addSystemEventTrigger("before", "shutdown", _before_shutdown)
    reactor.addSystemEventTrigger("after", "shutdown", write_remaining_audit)


def _start_upkeep() -> None:
    # From the start, not on the first request: a worker that serves nothing must still close
    # the sessions a killed worker left open.
    from identity.audit import ensure_audit_upkeep
    from mcp_endpoint.sessions import ensure_upkeep

    # The sessions and audit intents a killed worker left are closed / written as interrupted.
    asyncio.get_event_loop().call_soon(contextvars.Context().run, ensure_upkeep)
    asyncio.get_event_loop().call_soon(contextvars.Context().run, ensure_audit_upkeep)


def _take_over_sigterm(reactor: Any) -> None:
    # Twisted installs its handlers as the reactor starts; replace its SIGTERM one only, and only
    # if it is Twisted's (daphne without signal handlers, or an embedding server, keeps its own).
    handler = signal.getsignal(signal.SIGTERM)
    if getattr(handler, "__self__", None) is not reactor:
        return
    # A signal handler runs inside whatever was executing, request context included: handle it
    # in an empty context, so the drain's log lines are not attributed to a request.
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(contextvars.Context().run, _on_sigterm, reactor))


def _on_sigterm(reactor: Any) -> None:
    if state.draining:
        logger.warning("second SIGTERM: stopping now")
        _stop(reactor)
        return
    state.draining = True
    metrics.DRAINING.set(1)
    from fedmcp_site.runtime import request_guard

    request_guard.drain_connections()
    state.drain_task = asyncio.get_event_loop().create_task(_drain_then_stop(reactor), context=contextvars.Context())


def _stop_listening(reactor: Any) -> None:
    from twisted.internet.interfaces import IListeningPort

    for reader in list(reactor.getReaders()):
        if IListeningPort.providedBy(reader):
            # Accept what already waits in the backlog first: closing the socket would reset those
            # connections, and a balancer that has sent its request on one does not resend a POST.
            reader.doRead()
            reader.stopListening()


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


async def _drain_then_stop(reactor: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.FEDMCP_SHUTDOWN_GRACE
    logger.warning(
        "SIGTERM: draining; %d requests in flight, up to %.0fs to finish",
        len(observability.in_flight_tasks()), settings.FEDMCP_SHUTDOWN_GRACE,
    )
    try:
        await _wait_until_quiet(reactor, min(deadline, loop.time() + settings.FEDMCP_DRAIN_LISTEN))
        _stop_listening(reactor)
        while True:
            # Requests on the connections accepted last are read and started, legacy SSE replies
            # travel through the channel layer to their streams, responses leave the buffers.
            await asyncio.sleep(max(0.0, min(REPLY_SETTLE_SECONDS, deadline - loop.time())))
            if not (pending := observability.in_flight_tasks()):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning("grace period over: cancelling %d requests in flight", len(pending))
                break
            await asyncio.wait(pending, timeout=remaining)
        await _wait_for_writes(reactor, FLUSH_TIMEOUT)
        await _flush_audit()  # while everything is still up; release_worker flushes again
    finally:
        _stop(reactor)


async def _wait_until_quiet(reactor: Any, deadline: float) -> None:
    """Keep listening until nothing is in flight and no request came for FEDMCP_DRAIN_QUIET seconds, or until `deadline`.

    The deadline is FEDMCP_DRAIN_LISTEN seconds after the SIGTERM (within the grace period): a
    balancer without active health checks (nginx) never stops sending, and the requests it sent
    until then need the rest of the grace period to finish.
    """
    from fedmcp_site.runtime import request_guard

    loop = asyncio.get_running_loop()
    quiet = settings.FEDMCP_DRAIN_QUIET
    while (remaining := deadline - loop.time()) > 0:
        pending = observability.in_flight_tasks()
        quiet_for = reactor.seconds() - request_guard.last_request_at()
        if not pending and quiet_for >= quiet:
            return
        wait = min(remaining, max(0.05, quiet - quiet_for))
        if pending:
            await asyncio.wait(pending, timeout=wait)
        else:
            await asyncio.sleep(wait)
    logger.warning("requests still arrive %.0fs into the drain; no longer listening", settings.FEDMCP_DRAIN_LISTEN)


async def _wait_for_writes(reactor: Any, timeout: float) -> None:
    """Wait (bounded) until no connection has unsent bytes: the reactor drops them when it stops."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and any(getattr(w, "connected", False) for w in reactor.getWriters()):
        await asyncio.sleep(0.02)


def _before_shutdown() -> Any:
    from twisted.internet import defer

    task = asyncio.get_event_loop().create_task(release_worker(), context=contextvars.Context())
    return defer.Deferred.fromFuture(task)


async def release_worker() -> None:
    """Cancel the requests still running, then close upstream connections and Redis clients."""
    from federation import ratelimit
    from federation.pool import pool
    from fedmcp_lib import caching
    from mcp_endpoint.sessions import close_held_sessions

    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT
    # Until the reactor drops them, connections a balancer keeps alive may still bring requests:
    # cancel and wait again until nothing runs, so each one's audit row is in the flush below.
    while (pending := observability.in_flight_tasks(streams=True)) and loop.time() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=max(0.01, deadline - loop.time()))
    # Streams end with the process: their sessions are closed now, not when their leases expire.
    try:
        await asyncio.wait_for(close_held_sessions(), CANCEL_TIMEOUT)
    except Exception:
        logger.warning("could not close this worker's WebSocket and SSE sessions; their leases will expire", exc_info=True)
    try:
        await pool.close()
        await ratelimit.close()
        await caching.close()
    except Exception:
        logger.exception("releasing upstream connections failed")
    # The audit trail is written off the response path; what the requests above recorded,
    # cancelled ones included, is written before the process exits (last: nothing above records).
    await _flush_audit()


async def _flush_audit() -> None:
    from identity.audit import audit_flush

    try:
        await asyncio.wait_for(audit_flush(), CANCEL_TIMEOUT)
    except TimeoutError:
        logger.error("audit events were still being written at shutdown; some may be lost")


def write_remaining_audit() -> None:
    """Write what is still queued (recorded after the last flush), and log in full what cannot be.

    Runs after everything else at shutdown (a Twisted "after shutdown" trigger), on a thread of
    its own because the ORM refuses the event loop's thread; nothing is lost silently.
    """
    from identity.audit import audit_pending, audit_write_remaining, describe

    if not audit_pending():
        return
    unwritten: list[Any] = []

    def write() -> None:
        try:
            unwritten.extend(audit_write_remaining())
        finally:
            from django.db import connections

            connections.close_all()

    writer = threading.Thread(target=write, name="fedmcp-audit-at-exit")
    writer.start()
    writer.join(CANCEL_TIMEOUT)
    if writer.is_alive():
        logger.error("audit events were still being written at exit; some may be lost")
    for event in unwritten:
        # The database is unreachable: the log is the last place these events can go.
        logger.error("audit event not written at shutdown: %s", describe(event))
