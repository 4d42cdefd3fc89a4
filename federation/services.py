"""Peer lifecycle and catalog synchronisation: everything that writes peers or calls upstreams."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import JsonDict, PeerConfig, UpstreamConnection, UpstreamError, modern_meta

logger = logging.getLogger(__name__)

# (kind, list method, result key, the field that names an item, capability needed)
LISTINGS: tuple[tuple[str, str, str, str, str], ...] = (
    (CatalogKind.TOOL, "tools/list", "tools", "name", "tools"),
    (CatalogKind.RESOURCE, "resources/list", "resources", "uri", "resources"),
    (CatalogKind.RESOURCE_TEMPLATE, "resources/templates/list", "resourceTemplates", "uriTemplate", "resources"),
    (CatalogKind.PROMPT, "prompts/list", "prompts", "name", "prompts"),
)
MAX_PAGES = 100


class PeerConfigError(Exception):
    """The peer definition is invalid; the message says what to fix."""


@dataclass
class SyncReport:
    peer: str
    protocol_version: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def peer_add(
    *,
    name: str,
    transport: str,
    url: str = "",
    command: str = "",
    env: dict[str, str] | None = None,
    connect_timeout: float = 10.0,
    call_timeout: float = 60.0,
) -> Peer:
    """Create a peer after validating it.

    `command` is a shell-style command line for stdio peers ("uvx mcp-server-time --x").

    Raises:
        PeerConfigError: a field is invalid or the name is taken.
    """
    args: list[str] = []
    if transport == Transport.STDIO:
        try:
            parts = shlex.split(command)
        except ValueError as exc:
            raise PeerConfigError(f"cannot parse command: {exc}") from exc
        if not parts:
            raise PeerConfigError("a stdio peer needs --command")
        command, args = parts[0], parts[1:]
        url = ""
    elif not url:
        raise PeerConfigError(f"a {transport} peer needs --url")
    peer = Peer(
        name=name,
        transport=transport,
        url=url,
        command=command,
        args=args,
        env=env or {},
        connect_timeout=connect_timeout,
        call_timeout=call_timeout,
    )
    try:
        peer.full_clean()
    except ValidationError as exc:
        raise PeerConfigError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc
    peer.save()
    return peer


def peer_remove(*, peer: Peer) -> None:
    peer.delete()


async def _list_all(connection: UpstreamConnection, method: str, key: str) -> list[JsonDict]:
    items: list[JsonDict] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        params: JsonDict = {}
        if cursor:
            params["cursor"] = cursor
        if connection.era == "modern":
            params["_meta"] = modern_meta()
        reply = await connection.request(method, params)
        if "error" in reply:
            raise UpstreamError(f"{method} failed: {reply['error'].get('message', 'error')}")
        result = reply.get("result") or {}
        page = result.get(key)
        if not isinstance(page, list):
            raise UpstreamError(f"{method} returned no '{key}' list")
        items.extend(item for item in page if isinstance(item, dict))
        cursor = result.get("nextCursor")
        if not cursor:
            return items
    raise UpstreamError(f"{method} did not finish within {MAX_PAGES} pages")


async def fetch_catalog(connection: UpstreamConnection) -> tuple[dict[str, list[JsonDict]], dict[str, str]]:
    """List everything the upstream offers; returns (items per kind, errors per kind)."""
    capabilities = connection.description.capabilities
    found: dict[str, list[JsonDict]] = {}
    errors: dict[str, str] = {}
    for kind, method, key, _, capability in LISTINGS:
        if capability not in capabilities:
            found[kind] = []
            continue
        try:
            found[kind] = await _list_all(connection, method, key)
        except UpstreamError as exc:
            errors[kind] = str(exc)
    return found, errors


@transaction.atomic
def _store_catalog(peer: Peer, description: Any, found: dict[str, list[JsonDict]], errors: dict[str, str]) -> None:
    """Replace the catalog kinds that were listed successfully; keep the others as they were."""
    for kind, _, _, name_field, _ in LISTINGS:
        if kind not in found:
            continue
        existing = {e.upstream_name: e for e in peer.catalog.filter(kind=kind)}
        seen: set[str] = set()
        for position, item in enumerate(found[kind]):
            name = item.get(name_field)
            if not isinstance(name, str) or not name or name in seen:
                continue
            seen.add(name)
            entry = existing.get(name)
            if entry is None:
                CatalogEntry.objects.create(peer=peer, kind=kind, upstream_name=name, position=position, payload=item)
            elif entry.payload != item or entry.position != position:
                entry.payload, entry.position = item, position
                entry.save(update_fields=["payload", "position", "updated_at"])
        peer.catalog.filter(kind=kind).exclude(upstream_name__in=seen).delete()
    peer.protocol_version = description.protocol_version
    peer.server_info = description.server_info
    peer.capabilities = description.capabilities
    peer.instructions = description.instructions or ""
    peer.last_synced_at = timezone.now()
    peer.last_error = "; ".join(f"{k}: {v}" for k, v in errors.items())
    peer.save()


@database_sync_to_async
def _record_error(peer: Peer, message: str) -> None:
    Peer.objects.filter(pk=peer.pk).update(last_error=message)


async def peer_sync_catalog(*, peer: Peer, connection: UpstreamConnection | None = None) -> SyncReport:
    """Fetch the peer's catalog and store it.

    Uses `connection` when given (a warm one from the pool); otherwise opens a temporary one.
    A failure to list a kind keeps what was stored for that kind: a transient error never
    empties the catalog.
    """
    report = SyncReport(peer=peer.name)
    owned = connection is None
    if connection is None:
        kind = CONNECTION_KINDS.get(peer.transport)
        if kind is None:
            report.errors["connect"] = f"transport {peer.transport!r} is not supported yet"
            await _record_error(peer, report.errors["connect"])
            return report
        connection = kind(PeerConfig.from_peer(peer))
    try:
        if owned:
            await connection.start()
        found, report.errors = await fetch_catalog(connection)
    except UpstreamError as exc:
        report.errors["connect"] = str(exc)
        await _record_error(peer, str(exc))
        return report
    finally:
        if owned:
            await connection.close()
    await database_sync_to_async(_store_catalog)(peer, connection.description, found, report.errors)
    report.protocol_version = connection.description.protocol_version
    report.counts = {kind: len(items) for kind, items in found.items()}
    return report
