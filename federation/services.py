"""Peer lifecycle and catalog synchronisation: everything that writes peers or calls upstreams."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import transaction
from django.utils import timezone
from mcp.shared.inbound import find_invalid_x_mcp_header

from federation import naming
from federation.credentials import discover_token_url
from federation.events import publish_catalog_changed, publish_peer_retired
from federation.health import record_check
from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from federation.tls import PeerTls, check_dates
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import JsonDict, PeerConfig, UpstreamConnection, UpstreamError, modern_meta
from federation.upstream_oauth import upstream_auth
from fedmcp_lib import caching
from identity.trust.gateways import GatewayStanding, peer_gateway_standing

logger = logging.getLogger(__name__)

# (kind, list method, result key, the field that names an item, capability needed)
LISTINGS: tuple[tuple[str, str, str, str, str], ...] = (
    (CatalogKind.TOOL, "tools/list", "tools", "name", "tools"),
    (CatalogKind.RESOURCE, "resources/list", "resources", "uri", "resources"),
    (CatalogKind.RESOURCE_TEMPLATE, "resources/templates/list", "resourceTemplates", "uriTemplate", "resources"),
    (CatalogKind.PROMPT, "prompts/list", "prompts", "name", "prompts"),
)
MAX_PAGES = 100
PER_USER_KINDS = frozenset({CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE})
"""The kinds that are an account's own data at a per-user OAuth peer (federation/user_lists.py)."""
GATEWAY_CAPABILITY = "io.fedmcp/gateway"
"""Key under `capabilities.experimental` where a fedmcp gateway names itself (and its scope)."""


class PeerConfigError(Exception):
    """The peer definition is invalid; the message says what to fix."""


class CatalogTooLargeError(UpstreamError):
    """The upstream lists more than this gateway keeps of one peer (FEDERATION_MAX_CATALOG_*)."""


@dataclass
class CatalogBudget:
    """What is left of FEDERATION_MAX_CATALOG_BYTES for the kinds of one sync still to be listed."""

    bytes_left: int


def _item_bytes(item: JsonDict) -> int:
    return len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass
class SyncReport:
    peer: str
    protocol_version: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    """Catalog kinds whose stored items changed in this sync."""
    warnings: list[str] = field(default_factory=list)
    """What the operator should know though the sync worked (a gateway this one does not believe)."""
    diagnostics: str = ""
    """When the connection failed: what the upstream said about it (a stdio child's stderr), for
    the operator only."""

    @property
    def ok(self) -> bool:
        return not self.errors


def env_parse(pairs: Iterable[str]) -> dict[str, str]:
    """A stdio peer's environment from KEY=VALUE pairs (blank ones skipped); the value may hold "=" and spaces.

    Raises:
        PeerConfigError: a pair without "=" or without a key, quoted in the message.
    """
    env: dict[str, str] = {}
    for pair in pairs:
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PeerConfigError(f"write KEY=VALUE, not {pair!r}")
        env[key.strip()] = value
    return env


def peer_add(
    *,
    name: str,
    transport: str,
    url: str = "",
    command: str = "",
    env: dict[str, str] | None = None,
    connect_timeout: float = 10.0,
    call_timeout: float = 60.0,
    is_gateway: bool = False,
    per_identity: bool = False,
    max_processes: int = 8,
    client_id: str = "",
    client_secret: str = "",
    token_url: str = "",
    user_oauth: bool = False,
    tls_ca_bundle: str = "",
    tls_client_cert: str = "",
    tls_client_key: str = "",
) -> Peer:
    """Create a peer after validating it.

    `command` is a shell-style command line for stdio peers ("uvx mcp-server-time --x").
    `client_id`/`client_secret` are this gateway's client credentials at a peer gateway
    (the secret is stored encrypted); `token_url` is its token endpoint, discovered when blank.
    `user_oauth`: each user connects their own account at the peer's authorization server.
    `tls_*` are PEM texts: the CA bundle that verifies an HTTPS/WSS peer, and the client
    certificate and key for mutual TLS (the key is stored encrypted). See federation/tls.py.

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
    if max_processes < 1:
        raise PeerConfigError("--max-processes must be at least 1")
    if bool(client_id) != bool(client_secret):
        raise PeerConfigError("client credentials need both a client id and a client secret")
    if client_id and transport == Transport.STDIO:
        raise PeerConfigError("client credentials are for HTTP, SSE and WebSocket peers")
    if user_oauth and (transport == Transport.STDIO or is_gateway or client_id):
        raise PeerConfigError("per-user OAuth is for HTTP, SSE and WebSocket MCP servers, not for stdio peers or peer gateways")
    if user_oauth and name == "callback":
        raise PeerConfigError("'callback' is taken by /connect/callback; choose another name for a per-user OAuth peer")
    peer = Peer(
        name=name,
        transport=transport,
        url=url,
        command=command,
        args=args,
        env=env or {},
        connect_timeout=connect_timeout,
        call_timeout=call_timeout,
        is_gateway=is_gateway,
        per_identity=per_identity,
        max_processes=max_processes,
        client_id=client_id,
        client_secret=client_secret,
        token_url=token_url,
        user_oauth=user_oauth,
        tls_ca_bundle=tls_ca_bundle,
        tls_client_cert=tls_client_cert,
        tls_client_key=tls_client_key,
    )
    if tls_client_cert and not tls_client_key:
        raise PeerConfigError("a client certificate needs its private key")
    _validate(peer)
    peer.save()
    return peer


def _validate(peer: Peer) -> None:
    """Run the model's validation and refuse certificates that are not currently valid.

    Raises:
        PeerConfigError: what to fix, field by field.
    """
    try:
        peer.full_clean()
        check_dates(ca_bundle=peer.tls_ca_bundle, client_cert=peer.tls_client_cert)
    except ValidationError as exc:
        raise PeerConfigError(
            "; ".join(" ".join(v) if k == NON_FIELD_ERRORS else f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        ) from exc


def peer_set_tls(
    *, peer: Peer, ca_bundle: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> Peer:
    """Replace a peer's TLS settings; None keeps a setting, "" removes it.

    The certificate and key go together: replacing or removing one replaces or removes both.
    Workers pick the settings up with the peer's next configuration snapshot.

    Raises:
        PeerConfigError: a PEM text is invalid, expired, or the key does not match the certificate.
    """
    if (client_cert is None) != (client_key is None) or bool(client_cert) != bool(client_key):
        raise PeerConfigError("give the client certificate and its private key together")
    if ca_bundle is not None:
        peer.tls_ca_bundle = ca_bundle
    if client_cert is not None and client_key is not None:
        peer.tls_client_cert, peer.tls_client_key = client_cert, client_key
    _validate(peer)
    peer.save(update_fields=["tls_ca_bundle", "tls_client_cert", "tls_client_key", "updated_at"])
    return peer


def peer_remove(*, peer: Peer) -> None:
    peer.delete()


def peer_set_credentials(*, peer: Peer, client_id: str, client_secret: str, token_url: str = "") -> Peer:
    """Replace (or, with empty values, remove) the client credentials this gateway has at a peer.

    Workers pick them up with the peer's next configuration snapshot: the pool retires
    connections made with the old one.

    Raises:
        PeerConfigError: only one of id and secret given, or the peer is a stdio process.
    """
    if bool(client_id) != bool(client_secret):
        raise PeerConfigError("client credentials need both a client id and a client secret")
    if client_id and peer.transport == Transport.STDIO:
        raise PeerConfigError("client credentials are for HTTP, SSE and WebSocket peers")
    peer.client_id, peer.client_secret, peer.token_url = client_id, client_secret, token_url
    try:
        peer.full_clean()
    except ValidationError as exc:
        raise PeerConfigError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc
    peer.save(update_fields=["client_id", "client_secret", "token_url", "updated_at"])
    return peer


async def peer_discover_token_url(*, peer: Peer) -> str:
    """Discover the token endpoint of a peer with client credentials and store it.

    Raises:
        PeerCredentialsError: the peer's RFC 9728 / RFC 8414 metadata does not lead to one.
    """
    token_url = await discover_token_url(peer.url, tls=PeerTls(peer.tls_ca_bundle, peer.tls_client_cert, peer.tls_client_key))
    peer.token_url = token_url
    await Peer.objects.filter(pk=peer.pk).aupdate(token_url=token_url)
    caching.bump("catalog")  # workers' cached peer configs (fedmcp_lib/caching.py)
    return token_url


async def _list_all(connection: UpstreamConnection, method: str, key: str, kind: str, budget: CatalogBudget) -> list[JsonDict]:
    """Return every item of one list, page after page, within the catalog bounds.

    Listing stops at the first item past a bound, so a hostile upstream costs at most one
    page beyond it.

    Raises:
        CatalogTooLargeError: too many items, one too large, or the peer's catalog too large.
        UpstreamError: the upstream failed or answered nonsense.
    """
    items: list[JsonDict] = []
    size = 0
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
        for item in page:
            if not isinstance(item, dict):
                continue
            if len(items) >= settings.FEDERATION_MAX_CATALOG_ENTRIES:
                raise CatalogTooLargeError(
                    f"{method} lists more than {settings.FEDERATION_MAX_CATALOG_ENTRIES} {kind} entries "
                    "(FEDERATION_MAX_CATALOG_ENTRIES); the stored ones are kept"
                )
            item_size = _item_bytes(item)
            if item_size > settings.FEDERATION_MAX_CATALOG_ITEM_BYTES:
                raise CatalogTooLargeError(
                    f"{method} lists an item larger than {settings.FEDERATION_MAX_CATALOG_ITEM_BYTES} bytes "
                    "(FEDERATION_MAX_CATALOG_ITEM_BYTES); the stored ones are kept"
                )
            size += item_size
            if size > budget.bytes_left:
                raise CatalogTooLargeError(
                    f"{method} makes the peer's catalog more than {settings.FEDERATION_MAX_CATALOG_BYTES} bytes "
                    "(FEDERATION_MAX_CATALOG_BYTES); the stored ones are kept"
                )
            items.append(item)
        cursor = result.get("nextCursor")
        if not cursor:
            budget.bytes_left -= size
            return items
    raise UpstreamError(f"{method} did not finish within {MAX_PAGES} pages")


async def fetch_catalog(connection: UpstreamConnection) -> tuple[dict[str, list[JsonDict]], dict[str, str]]:
    """List everything the upstream offers; returns (items per kind, errors per kind)."""
    capabilities = connection.description.capabilities
    found: dict[str, list[JsonDict]] = {}
    errors: dict[str, str] = {}
    budget = CatalogBudget(settings.FEDERATION_MAX_CATALOG_BYTES)
    for kind, method, key, _, capability in LISTINGS:
        if capability not in capabilities or (connection.peer.user_oauth and kind in PER_USER_KINDS):
            # A per-user OAuth peer's resources are each account's own: listed per user, live,
            # never stored from the one account the catalog is synced with (federation/user_lists.py).
            found[kind] = []
            continue
        try:
            found[kind] = await _list_all(connection, method, key, kind, budget)
        except CatalogTooLargeError as exc:
            # Refused, not a passing fault: the operator must raise the bound or drop the peer.
            logger.warning("peer %s: catalog sync refused: %s", connection.peer.name, exc)
            errors[kind] = str(exc)
        except UpstreamError as exc:
            errors[kind] = str(exc)
    return found, errors


def gateway_identity(capabilities: JsonDict) -> JsonDict | None:
    """Return what a fedmcp gateway says about itself in its capabilities, if it is one."""
    experimental = capabilities.get("experimental")
    identity = experimental.get(GATEWAY_CAPABILITY) if isinstance(experimental, dict) else None
    if isinstance(identity, dict) and isinstance(identity.get("name"), str):
        return identity
    return None


def host_naming(peer: Peer, kind: str, upstream_name: str, taken: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """Return (aggregated name, home) for one catalog item, or None to leave it out.

    A peer's items live under a home it owns. A plain peer's, and those of a gateway this one
    does not believe (`peer.remote_gateway` is blank), under the peer's own name: whatever they
    are called, `<peer>__…`. A believed peer gateway's items keep the home of the gateway that
    owns them: its own peers' under its name (`b.<peer>`), what it imported from further away
    under that owner's; but never this gateway's own homes (listed back to us: left out, which
    stops catalog loops), nor those of another gateway this one peers directly (`taken`: that
    peer alone lists them).
    """
    is_uri = kind in (CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE)
    qualify = naming.qualify_uri if is_uri else naming.qualify_name
    if peer.is_gateway and peer.remote_gateway:
        parts = (naming.split_uri if is_uri else naming.split_name)(upstream_name)
        if parts is not None:
            home = naming.import_home(peer.remote_gateway, parts[0])
            owner = naming.home_gateway(home)
            if owner == settings.FEDMCP_GATEWAY_NAME or (owner != peer.remote_gateway and owner in taken):
                return None
            return qualify(home, parts[1]), home
    return qualify(peer.name, upstream_name), peer.name


def claimed_gateway(description: Any) -> str | None:
    """The fedmcp gateway name an upstream gives its aggregated endpoint, or None (per-peer endpoints name a scope)."""
    identity = gateway_identity(description.capabilities)
    return identity["name"] if identity is not None and not identity.get("scope") else None


def _gateway_standing(peer: Peer, claimed: str | None) -> tuple[GatewayStanding, frozenset[str]]:
    """What this gateway believes of `peer` as a gateway, and the homes other peer gateways own."""
    standing = peer_gateway_standing(is_gateway=peer.is_gateway, url=peer.url, claimed=claimed)
    others = Peer.objects.filter(is_gateway=True).exclude(pk=peer.pk).exclude(remote_gateway="")
    return standing, frozenset(others.values_list("remote_gateway", flat=True))


@transaction.atomic
def _store_catalog(
    peer: Peer, description: Any, found: dict[str, list[JsonDict]], errors: dict[str, str], warnings: list[str] | None = None
) -> list[str]:
    """Replace the catalog kinds that were listed successfully; keep the others as they were.

    Returns the kinds whose items changed; adds to `warnings` what the operator should know.
    """
    changed: list[str] = []
    claimed = claimed_gateway(description)
    standing, taken = _gateway_standing(peer, claimed)
    # Only what this gateway believes decides the homes (identity/trust/gateways.py); what the peer
    # says of itself is kept as a suggestion for the operator, never as trust.
    peer.remote_gateway = standing.name
    peer.suggested_gateway = claimed if claimed and not standing.trusted else ""
    if standing.reason:
        if peer.is_gateway:
            logger.warning("peer %s: %s", peer.name, standing.reason)
        else:
            logger.info("peer %s: %s", peer.name, standing.reason)
        if warnings is not None:
            warnings.append(standing.reason)
    for kind, _, _, name_field, _ in LISTINGS:
        if kind not in found:
            continue
        existing = {e.upstream_name: e for e in peer.catalog.filter(kind=kind)}
        seen: set[str] = set()
        for position, item in enumerate(found[kind]):
            upstream_name = item.get(name_field)
            if not isinstance(upstream_name, str) or not upstream_name:
                continue
            if kind in (CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE):
                # Stored, listed and routed in the one form requests are routed in (naming.canonical_uri).
                upstream_name = naming.canonical_uri(upstream_name)
                item = {**item, name_field: upstream_name}
            if upstream_name in seen:
                continue
            if kind == CatalogKind.TOOL and (invalid := find_invalid_x_mcp_header(item.get("inputSchema"))) is not None:
                # SEP-2243: clients MUST leave out such a tool; hosts behind the gateway never see it.
                reason = f"tool {upstream_name!r} left out: invalid x-mcp-header ({invalid})"
                logger.warning("peer %s: %s", peer.name, reason)
                if warnings is not None:
                    warnings.append(reason)
                continue
            naming_ = host_naming(peer, kind, upstream_name, taken)
            if naming_ is None:
                continue
            seen.add(upstream_name)
            name, home = naming_
            entry = existing.get(upstream_name)
            if entry is None:
                CatalogEntry.objects.create(
                    peer=peer, kind=kind, upstream_name=upstream_name, name=name, home=home, position=position, payload=item
                )
                changed.append(kind)
            elif (entry.payload, entry.position, entry.name, entry.home) != (item, position, name, home):
                entry.payload, entry.position, entry.name, entry.home = item, position, name, home
                entry.save(update_fields=["payload", "position", "name", "home", "updated_at"])
                changed.append(kind)
        deleted, _ = peer.catalog.filter(kind=kind).exclude(upstream_name__in=seen).delete()
        if deleted:
            changed.append(kind)
    peer.protocol_version = description.protocol_version
    peer.server_info = description.server_info
    peer.capabilities = description.capabilities
    peer.instructions = description.instructions or ""
    peer.last_synced_at = timezone.now()
    # A gateway the operator marked but this one does not believe is a configuration error to fix.
    peer.last_error = "; ".join([*(f"{k}: {v}" for k, v in errors.items()), *((warnings or []) if peer.is_gateway else [])])
    peer.save()
    return sorted(set(changed))


@database_sync_to_async
def _record_error(peer: Peer, message: str) -> None:
    Peer.objects.filter(pk=peer.pk).update(last_error=message)


async def peer_sync_catalog(
    *, peer: Peer, connection: UpstreamConnection | None = None, connect_timeout: float | None = None, record_health: bool = False
) -> SyncReport:
    """Fetch the peer's catalog and store it.

    Uses `connection` when given (a warm one from the pool); otherwise opens a temporary one,
    with `connect_timeout` instead of the peer's own when given (a first start that downloads
    the server). With `record_health`, the outcome is also the peer's first health check
    (the admin's health history, the dashboard). A failure to list a kind keeps what was stored
    for that kind: a transient error never empties the catalog.
    """
    report = SyncReport(peer=peer.name)
    owned = connection is None
    if connection is None:
        kind = CONNECTION_KINDS.get(peer.transport)
        if kind is None:
            report.errors["connect"] = f"transport {peer.transport!r} is not supported yet"
            await _record_error(peer, report.errors["connect"])
            return report
        config = PeerConfig.from_peer(peer)
        if connect_timeout is not None:
            config = dataclasses.replace(config, connect_timeout=connect_timeout)
        connection = kind(config, auth=upstream_auth(config))
    started = time.monotonic()
    try:
        if owned:
            await connection.start()
        found, report.errors = await fetch_catalog(connection)
    except UpstreamError as exc:
        report.errors["connect"] = str(exc)
        report.diagnostics = connection.diagnostics()
        await _record_error(peer, str(exc))
        if record_health:
            await _record_health(peer, ok=False, latency_ms=None, error=str(exc))
        return report
    finally:
        if owned:
            await connection.close()
    if record_health:
        await _record_health(peer, ok=True, latency_ms=(time.monotonic() - started) * 1000, error="")
    if peer.is_gateway and gateway_identity(connection.description.capabilities) is None:
        report.errors["connect"] = f"peer '{peer.name}' was added as a gateway but does not identify as a fedmcp gateway"
        await _record_error(peer, report.errors["connect"])
        return report
    report.changed = await database_sync_to_async(_store_catalog)(peer, connection.description, found, report.errors, report.warnings)
    report.protocol_version = connection.description.protocol_version
    report.counts = {kind: len(items) for kind, items in found.items()}
    return report


async def _record_health(peer: Peer, *, ok: bool, latency_ms: float | None, error: str) -> None:
    await record_check(peer.pk, ok, latency_ms, error)


async def catalog_set_enabled(*, entry_ids: list[int], enabled: bool) -> dict[str, list[str]]:
    """Switch catalog items on or off and tell connected hosts (list_changed) what changed.

    Returns the kinds that changed, per peer name.
    """
    changed = await database_sync_to_async(_set_entries_enabled)(entry_ids, enabled)
    for peer_name, kinds in changed.items():
        await publish_catalog_changed(peer_name, kinds)
    return changed


@transaction.atomic
def _set_entries_enabled(entry_ids: list[int], enabled: bool) -> dict[str, list[str]]:
    rows = CatalogEntry.objects.filter(pk__in=entry_ids).exclude(enabled=enabled).select_related("peer")
    changed: dict[str, set[str]] = {}
    for entry in rows:
        changed.setdefault(entry.peer.name, set()).add(entry.kind)
    CatalogEntry.objects.filter(pk__in=entry_ids).exclude(enabled=enabled).update(enabled=enabled)
    return {name: sorted(kinds) for name, kinds in changed.items()}


async def peer_set_enabled(*, peer_ids: list[int], enabled: bool) -> list[str]:
    """Enable or disable peers; hosts get list_changed for every kind. Returns the changed names."""

    @database_sync_to_async
    def _switch() -> list[str]:
        rows = Peer.objects.filter(pk__in=peer_ids).exclude(enabled=enabled)
        names = list(rows.values_list("name", flat=True))
        rows.update(enabled=enabled)
        return names

    names = await _switch()
    for name in names:
        await publish_catalog_changed(name, [kind for kind, *_ in LISTINGS])
    if not enabled:
        # QuerySet.update() sends no post_save: tell the workers here (federation/apps.py does for saves).
        for peer_id in await database_sync_to_async(lambda: list(Peer.objects.filter(name__in=names).values_list("pk", flat=True)))():
            await publish_peer_retired(peer_id)
    return names


@dataclass
class FirstConnect:
    """What happened when a newly added peer was contacted for the first time."""

    report: SyncReport
    kept: bool
    """False when the peer could not be reached and was removed again (no `force`)."""
    notes: list[str] = field(default_factory=list)
    """What the operator should read besides the report (the token endpoint found, a download wait)."""

    @property
    def connected(self) -> bool:
        return "connect" not in self.report.errors


def first_start_timeout(peer: Peer, connect_timeout_chosen: bool) -> float | None:
    """The connect timeout of a peer's first start: longer for a launcher (npx, uvx) that downloads
    the server, unless the operator chose one; None keeps the peer's own."""
    from federation.upstream.stdio import FIRST_START_TIMEOUT, fetches_on_first_start

    if peer.transport == Transport.STDIO and not connect_timeout_chosen and fetches_on_first_start(peer.command):
        return FIRST_START_TIMEOUT
    return None


async def peer_connect_first(
    *, peer: Peer, force: bool = False, connect_timeout_chosen: bool = True, on_note: Any = None
) -> FirstConnect:
    """Contact a peer just added (`peer_add`): its catalog is listed and the outcome is its first
    health check. A peer that cannot be reached is removed again unless `force`: an operator is
    never left with an enabled peer that fails every call.

    The same rule for `manage.py peer add` and the admin's add form. `on_note(text)` hears each
    note as it happens (a CLI prints the download wait before it waits).
    """
    from federation.credentials import PeerCredentialsError

    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)

    if peer.client_id and not peer.token_url:
        try:
            token_url = await peer_discover_token_url(peer=peer)
        except PeerCredentialsError as exc:
            note(f"Could not discover the token endpoint: {exc}")
        else:
            note(f"Token endpoint of {peer.name}: {token_url}")
    timeout = first_start_timeout(peer, connect_timeout_chosen)
    if timeout is not None:
        note(f"{peer.command} downloads the server the first time it runs it: waiting up to {timeout:g}s for it to start")
    report = await peer_sync_catalog(peer=peer, connect_timeout=timeout, record_health=True)
    if report.changed:
        await publish_catalog_changed(peer.name, report.changed)
    kept = "connect" not in report.errors or force
    if not kept:
        await database_sync_to_async(peer_remove)(peer=peer)
    return FirstConnect(report=report, kept=kept, notes=notes)


@dataclass
class ProbeResult:
    ok: bool
    latency_ms: float | None
    error: str = ""
    diagnostics: str = ""


async def peer_probe(*, peer: Peer) -> ProbeResult:
    """Check a peer's health now, on a connection of its own (the operator's "Test"), and record it.

    Connects and handshakes, then pings (handshake era) or asks server/discover (2026-07-28),
    as the background probe does (federation/health.py); the pool and its circuit breakers are
    left alone.
    """
    kind = CONNECTION_KINDS.get(peer.transport)
    if kind is None:
        return ProbeResult(ok=False, latency_ms=None, error=f"transport {peer.transport!r} is not supported yet")
    config = PeerConfig.from_peer(peer)
    connection = kind(config, auth=upstream_auth(config))
    started = time.monotonic()
    try:
        await connection.start()
        await connection.probe()
    except (UpstreamError, OSError) as exc:
        result = ProbeResult(ok=False, latency_ms=None, error=str(exc) or type(exc).__name__, diagnostics=connection.diagnostics())
    else:
        result = ProbeResult(ok=True, latency_ms=(time.monotonic() - started) * 1000)
    finally:
        await connection.close()
    await _record_health(peer, ok=result.ok, latency_ms=result.latency_ms, error=result.error)
    return result
