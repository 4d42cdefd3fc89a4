"""Configuration export and import: peers, catalog switches, rate limits (and consent policies).

Secrets never leave the gateway: a peer's `client_secret`, its TLS client key and its stdio
`env` (values and names) are left out of the export, and an import never changes the ones stored.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import IntegrityError, transaction

from federation.models import CatalogEntry, Peer, RateLimit
from identity.models import ConsentPolicy

FORMAT = "fedmcp-config/1"
SECRET_FIELDS = ("client_secret", "tls_client_key", "env")
"""Peer fields left out of exports (write-only secrets)."""
PEER_FIELDS = (
    "name", "transport", "url", "command", "args", "enabled", "is_gateway", "remote_gateway", "client_id", "token_url",
    "tls_ca_bundle", "tls_client_cert", "per_identity", "max_processes", "connect_timeout", "call_timeout",
)
CATALOG_FIELDS = ("kind", "upstream_name", "name", "home", "position", "payload", "enabled")


class ConfigImportError(Exception):
    """The document is not a fedmcp configuration export; the message says why."""


def _policy_rows() -> list[dict[str, Any]]:
    policy = ConsentPolicy
    skip = {"id", "created_at", "updated_at"}
    rows = []
    for obj in policy.objects.all():
        row: dict[str, Any] = {}
        for f in policy._meta.concrete_fields:
            if f.name in skip:
                continue
            value = getattr(obj, f.attname)
            if f.is_relation and f.related_model is Peer:
                value = obj.peer.name if value else None
                row[f.name] = value
            elif f.is_relation and f.related_model is get_user_model():
                row[f.name] = getattr(obj, f.name).get_username() if value else None
            elif f.is_relation and f.related_model is Group:
                row[f.name] = getattr(obj, f.name).name if value else None
            elif not f.is_relation:
                row[f.name] = value if isinstance(value, str | int | float | bool | list | dict | type(None)) else str(value)
        rows.append(row)
    return rows


def config_export() -> dict[str, Any]:
    """Return the gateway's configuration as a JSON-ready dict, without secrets."""
    peers = []
    for peer in Peer.objects.order_by("name").prefetch_related("catalog"):
        row = {f: getattr(peer, f) for f in PEER_FIELDS}
        row["catalog"] = [{f: getattr(e, f) for f in CATALOG_FIELDS} for e in peer.catalog.all()]
        peers.append(row)
    limits = [
        {
            "scope": r.scope,
            "user": r.user.get_username() if r.user_id else None,
            "client_id": r.client_id,
            "peer": r.peer.name if r.peer_id else None,
            "rate_per_minute": r.rate_per_minute,
            "burst": r.burst,
        }
        for r in RateLimit.objects.select_related("user", "peer")
    ]
    return {"format": FORMAT, "secrets_omitted": [f"peer.{f}" for f in SECRET_FIELDS], "peers": peers,
            "rate_limits": limits, "policies": _policy_rows()}


def config_import(*, document: dict[str, Any]) -> dict[str, int]:
    """Create or update what `document` describes; running it twice changes nothing more.

    Peers are matched by name, catalog items by (peer, kind, upstream name), rate limits by
    their target. Nothing absent from the document is deleted; stored secrets are kept.

    Raises:
        ConfigImportError: the document is not a fedmcp configuration export.
    """
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigImportError(f"expected a document with \"format\": \"{FORMAT}\"")
    try:
        with transaction.atomic():
            return _import(document)
    # AttributeError: a row that is not an object (e.g. "rate_limits": ["x"]).
    except (AttributeError, KeyError, TypeError, ValueError, ObjectDoesNotExist, ValidationError, IntegrityError) as exc:
        raise ConfigImportError(f"the document does not fit this gateway: {exc!r}") from exc


def _import(document: dict[str, Any]) -> dict[str, int]:
    counts = {"peers": 0, "catalog": 0, "rate_limits": 0, "policies": 0}
    for row in document.get("peers") or []:
        if not isinstance(row, dict) or not row.get("name"):
            raise ConfigImportError("every peer needs a name")
        values = {f: row[f] for f in PEER_FIELDS if f in row and f != "name"}
        peer = Peer.objects.filter(name=row["name"]).first() or Peer(name=row["name"])
        for key, value in values.items():
            setattr(peer, key, value)
        try:
            peer.full_clean(exclude=list(SECRET_FIELDS))
        except ValidationError as exc:
            raise ConfigImportError(f"peer {row['name']!r}: {exc}") from exc
        peer.save()
        counts["peers"] += 1
        for item in row.get("catalog") or []:
            entry = CatalogEntry.objects.update_or_create(
                peer=peer, kind=item["kind"], upstream_name=item["upstream_name"],
                defaults={f: item[f] for f in CATALOG_FIELDS if f in item and f not in ("kind", "upstream_name")},
            )[0]
            entry.full_clean()  # e.g. an unknown kind; the whole import rolls back
            counts["catalog"] += 1
    users = get_user_model()
    for row in document.get("rate_limits") or []:
        user = users.objects.get_or_create(**{users.USERNAME_FIELD: row["user"]})[0] if row.get("user") else None
        peer = Peer.objects.get(name=row["peer"]) if row.get("peer") else None
        RateLimit.objects.update_or_create(
            scope=row["scope"], user=user, client_id=row.get("client_id") or "", peer=peer,
            defaults={"rate_per_minute": row["rate_per_minute"], "burst": row["burst"]},
        )[0].full_clean()
        counts["rate_limits"] += 1
    counts["policies"] = _import_policies(document.get("policies") or [])
    return counts


def _import_policies(rows: list[dict[str, Any]]) -> int:
    policy = ConsentPolicy
    if not rows:
        return 0
    users = get_user_model()
    count = 0
    for row in rows:
        values: dict[str, Any] = {}
        for f in policy._meta.concrete_fields:
            if f.name not in row:
                continue
            if f.is_relation and f.related_model is Peer:
                values[f.name] = Peer.objects.get(name=row[f.name]) if row[f.name] else None
            elif f.is_relation and f.related_model is users:
                values[f.name] = users.objects.get_or_create(**{users.USERNAME_FIELD: row[f.name]})[0] if row[f.name] else None
            elif f.is_relation and f.related_model is Group:
                values[f.name] = Group.objects.get_or_create(name=row[f.name])[0] if row[f.name] else None
            elif not f.is_relation:
                values[f.name] = row[f.name]
        if not policy.objects.filter(**values).exists():
            candidate = policy(**values)
            candidate.full_clean()  # e.g. a decision that is not allow/ask/deny
            candidate.save()
        count += 1
    return count
