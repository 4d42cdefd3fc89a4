"""The audit trail of forwarded calls, written off the response path.

`audit_record` builds the event in memory and saves it in a background task, so a host never
waits for the audit insert. Pending writes are not lost on a normal shutdown: the worker's
shutdown (fedmcp_site/lifecycle.py `release_worker`) awaits `audit_flush`, as tests can.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async

from identity.models import AuditEvent
from identity.tokens import Identity

logger = logging.getLogger(__name__)

_pending: set[asyncio.Task[None]] = set()


def audit_record(
    *,
    identity: Identity | None,
    peer: str,
    method: str,
    name: str,
    error_code: int | None,
    latency_ms: float,
    via: list[str] | tuple[str, ...] = (),
    decision: str = "",
) -> None:
    """Record one forwarded call (`error_code` None means it succeeded), without waiting."""
    event = AuditEvent(
        user_id=identity.user_id if identity else None,
        username=identity.username if identity else "",
        federated_issuer=identity.federated_issuer if identity else "",
        federated_subject=identity.federated_subject if identity else "",
        client_id=identity.client_id if identity else "",
        via=list(via or (identity.via if identity else ())),
        peer=peer,
        method=method,
        name=name[:2000],
        outcome="ok" if error_code is None else "error",
        error_code=error_code,
        decision=decision,
        latency_ms=round(latency_ms, 3),
    )
    task = asyncio.get_running_loop().create_task(_write(event))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def audit_flush() -> None:
    """Wait until every audit event recorded so far is written."""
    while _pending:
        await asyncio.gather(*list(_pending), return_exceptions=True)


@database_sync_to_async
def _save(event: AuditEvent) -> None:
    event.save()


async def _write(event: AuditEvent) -> None:
    try:
        await _save(event)
    except Exception:
        logger.exception("could not write the audit event %s", event)

