"""Reads behind the dashboard: per-peer traffic from the audit log (shared by every worker)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.apps import apps
from django.db.models import Q
from django.utils import timezone

from federation.models import Peer, PeerHealthCheck
from identity.models import AuditEvent

WINDOW_MINUTES = 15
"""How much of the audit log the dashboard summarises."""


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return round(ordered[rank - 1], 1)


def consent_model(name: str) -> Any:
    """Return a consent model if the consent feature is installed, else None."""
    try:
        return apps.get_model("identity", name)
    except LookupError:
        return None


def pending_prompts_count() -> int:
    prompt = consent_model("ConsentPrompt")
    if prompt is None:
        return 0
    field_names = {f.name for f in prompt._meta.get_fields()}
    if "status" in field_names and "expires_at" in field_names:
        return int(prompt.objects.filter(status="pending", expires_at__gt=timezone.now()).count())
    if "status" in field_names:
        return int(prompt.objects.filter(status="pending").count())
    if "decided_at" in field_names:
        return int(prompt.objects.filter(decided_at__isnull=True).count())
    return int(prompt.objects.count())


def dashboard_stats(*, minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
    """Summarise the last `minutes` of forwarded calls per peer, with one bucket per minute."""
    now = timezone.now().replace(microsecond=0)
    since = now - timedelta(minutes=minutes)
    # Upstream sampling/elicitation requests have audit events of their own; they are not calls
    # (and their latency includes the user's time to answer a consent prompt).
    events = (
        AuditEvent.objects.filter(at__gte=since)
        .exclude(method__in=("sampling/createMessage", "elicitation/create"))
        .values_list("peer", "at", "outcome", "latency_ms")
    )
    per_peer: dict[str, dict[str, Any]] = {}
    for peer_name, at, outcome, latency in events.iterator(chunk_size=5000):
        row = per_peer.setdefault(peer_name, {"latencies": [], "errors": 0, "series": [0] * minutes, "error_series": [0] * minutes})
        row["latencies"].append(latency)
        bucket = min(minutes - 1, max(0, int((at - since).total_seconds() // 60)))
        row["series"][bucket] += 1
        if outcome == "error":
            row["errors"] += 1
            row["error_series"][bucket] += 1
    peers = []
    known = set()
    for peer in Peer.objects.order_by("name"):
        known.add(peer.name)
        last = PeerHealthCheck.objects.filter(peer=peer).first()
        peers.append(_peer_row(peer.name, per_peer.get(peer.name), minutes, {
            "enabled": peer.enabled,
            "health": "not checked yet" if last is None else ("ok" if last.ok else "failing"),
            "checked_at": last.checked_at.isoformat() if last else None,
            "health_error": last.error if last and not last.ok else "",
            "last_error": peer.last_error,
            "catalog": peer.catalog.count(),
            "disabled_items": peer.catalog.filter(~Q(enabled=True)).count(),
        }))
    for name in sorted(set(per_peer) - known):  # calls to peers since removed
        peers.append(_peer_row(name, per_peer[name], minutes, {"enabled": False, "health": "removed"}))
    total = sum(p["calls"] for p in peers)
    errors = sum(p["errors"] for p in peers)
    return {
        "generated_at": now.isoformat(),
        "window_minutes": minutes,
        "since": since.isoformat(),
        "totals": {
            "calls": total,
            "errors": errors,
            "calls_per_minute": round(total / minutes, 2),
            "error_rate": round(errors / total, 4) if total else 0.0,
            "pending_prompts": pending_prompts_count(),
            "peers": len(known),
        },
        "peers": peers,
    }


def _peer_row(name: str, traffic: dict[str, Any] | None, minutes: int, info: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = traffic["latencies"] if traffic else []
    calls = len(latencies)
    errors = traffic["errors"] if traffic else 0
    return {
        "name": name,
        **info,
        "calls": calls,
        "errors": errors,
        "calls_per_minute": round(calls / minutes, 2),
        "error_rate": round(errors / calls, 4) if calls else 0.0,
        "latency_p50_ms": percentile(latencies, 0.50),
        "latency_p95_ms": percentile(latencies, 0.95),
        "series": traffic["series"] if traffic else [0] * minutes,
        "error_series": traffic["error_series"] if traffic else [0] * minutes,
    }
