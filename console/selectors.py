"""Reads behind the dashboard: per-peer traffic from the audit log (shared by every worker)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from federation.models import Peer, PeerHealthCheck
from identity.models import AuditEvent, ConsentPrompt
from mcp_endpoint import jsonrpc

WINDOW_MINUTES = 15
"""How much of the audit log the dashboard summarises."""


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return round(ordered[rank - 1], 1)


def pending_prompts_count() -> int:
    """Consent prompts waiting for a user's answer now (expired ones wait for nobody)."""
    return ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING, expires_at__gt=timezone.now()).count()


HUMAN_WAIT = frozenset({"approved", "denied", "timeout", "ask-home", "rejected"})
"""Consent words whose call waited for a person (docs/CONSENT.md "Outcomes"): its latency is mostly
that person's time, not the upstream's."""
REFUSAL_WORDS = {"deny": "policy", "denied": "user", "rejected": "user", "timeout": "unanswered"}
"""Consent words of calls that never reached the upstream, and why, in the dashboard's words."""
REFUSAL_CODES = {
    jsonrpc.RATE_LIMITED: "rate limit", jsonrpc.CONSENT_DENIED: "policy", jsonrpc.CONSENT_TIMEOUT: "unanswered",
    jsonrpc.INSUFFICIENT_SCOPE: "scope", jsonrpc.CONSENT_REQUIRED_AT_HOME: "policy",
    jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED: "not connected",
}
"""Error codes the gateway answers itself, before or instead of the upstream: refusals, not upstream errors."""


def classify(decision: str, outcome: str, error_code: int | None) -> tuple[str, str]:
    """Say what one audited call was: ("refused", why), ("asked", ""), ("waited", "") or ("upstream", "").

    "asked": a 2026-07-28 call answered input_required for consent (the host retries after
    the user answers). "waited": it reached the upstream after a person answered, so its
    latency is theirs too. "upstream": everything the upstream's own latency and errors are
    made of.
    """
    if decision in REFUSAL_WORDS:
        return "refused", REFUSAL_WORDS[decision]
    if outcome == "error" and error_code in REFUSAL_CODES:
        return "refused", REFUSAL_CODES[error_code]
    if decision == "ask" and outcome == "input":
        return "asked", ""
    if decision in HUMAN_WAIT:
        return "waited", ""
    return "upstream", ""


def _new_row(minutes: int) -> dict[str, Any]:
    return {
        "latencies": [], "waits": [], "calls": 0, "upstream_calls": 0, "errors": 0, "asked": 0, "refused": {},
        "series": [0] * minutes, "error_series": [0] * minutes, "refused_series": [0] * minutes,
    }


def dashboard_stats(*, minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
    """Summarise the last `minutes` of forwarded calls per peer, with one bucket per minute.

    Upstream latency and errors count only what the upstream did: a call that waited for a
    person's consent is counted under consent (its wait), one the gateway refused (policy, user,
    rate limit, scope) under refusals, never as the peer's slowness or failure.
    """
    now = timezone.now().replace(microsecond=0)
    since = now - timedelta(minutes=minutes)
    # Upstream sampling/elicitation requests have audit events of their own; they are not calls
    # (and their latency includes the user's time to answer a consent prompt).
    events = (
        AuditEvent.objects.filter(at__gte=since)
        .exclude(method__in=("sampling/createMessage", "elicitation/create"))
        .values_list("peer", "at", "outcome", "latency_ms", "decision", "error_code")
    )
    per_peer: dict[str, dict[str, Any]] = {}
    for peer_name, at, outcome, latency, decision, error_code in events.iterator(chunk_size=5000):
        row = per_peer.setdefault(peer_name, _new_row(minutes))
        bucket = min(minutes - 1, max(0, int((at - since).total_seconds() // 60)))
        row["calls"] += 1
        row["series"][bucket] += 1
        what, why = classify(decision, outcome, error_code)
        if what == "refused":
            row["refused"][why] = row["refused"].get(why, 0) + 1
            row["refused_series"][bucket] += 1
            if decision in HUMAN_WAIT:
                row["waits"].append(latency)
            continue
        if what == "asked":
            row["asked"] += 1
            continue
        row["upstream_calls"] += 1
        if what == "waited":
            row["waits"].append(latency)
        else:
            row["latencies"].append(latency)
        if outcome == "error":
            row["errors"] += 1
            row["error_series"][bucket] += 1
    peers = []
    known = set()
    for peer in Peer.objects.order_by("name"):
        known.add(peer.name)
        last = PeerHealthCheck.objects.filter(peer=peer).first()
        peers.append(_peer_row(peer.name, per_peer.get(peer.name), minutes, {
            "url": reverse("admin:federation_peer_change", args=[peer.pk]),
            "enabled": peer.enabled,
            "health": "not checked yet" if last is None else ("ok" if last.ok else "failing"),
            "checked_at": last.checked_at.isoformat() if last else None,
            "health_error": last.error if last and not last.ok else "",
            "last_error": peer.last_error,
            "catalog": peer.catalog.count(),
            "disabled_items": peer.catalog.filter(~Q(enabled=True)).count(),
        }))
    for name in sorted(set(per_peer) - known):  # calls to peers since removed
        peers.append(_peer_row(name, per_peer[name], minutes, {"url": "", "enabled": False, "health": "removed"}))
    total = sum(p["calls"] for p in peers)
    upstream = sum(p["upstream_calls"] for p in peers)
    errors = sum(p["errors"] for p in peers)
    waits = [w for row in per_peer.values() for w in row["waits"]]
    return {
        "generated_at": now.isoformat(),
        "window_minutes": minutes,
        "since": since.isoformat(),
        "totals": {
            "calls": total,
            "errors": errors,
            "calls_per_minute": round(total / minutes, 1),
            "error_rate": round(errors / upstream, 4) if upstream else 0.0,
            "refused": sum(p["refused"] for p in peers),
            "consent_asked": sum(p["consent_asked"] for p in peers),
            "consent_wait_p95_ms": _rounded(percentile(waits, 0.95)),
            "pending_prompts": pending_prompts_count(),
            "peers": len(known),
        },
        "peers": peers,
    }


def _rounded(value: float | None) -> float | None:
    """Milliseconds as people read them: whole above 10 ms, one decimal below."""
    if value is None:
        return None
    return round(value) if value >= 10 else round(value, 1)


def _peer_row(name: str, traffic: dict[str, Any] | None, minutes: int, info: dict[str, Any]) -> dict[str, Any]:
    traffic = traffic or _new_row(minutes)
    calls, upstream, errors = traffic["calls"], traffic["upstream_calls"], traffic["errors"]
    return {
        "name": name,
        **info,
        "calls": calls,
        "upstream_calls": upstream,
        "errors": errors,
        "calls_per_minute": round(calls / minutes, 1),
        "error_rate": round(errors / upstream, 4) if upstream else 0.0,
        "latency_p50_ms": _rounded(percentile(traffic["latencies"], 0.50)),
        "latency_p95_ms": _rounded(percentile(traffic["latencies"], 0.95)),
        "refused": sum(traffic["refused"].values()),
        "refused_by": dict(sorted(traffic["refused"].items())),
        "consent_asked": traffic["asked"],
        "consent_waits": len(traffic["waits"]),
        "consent_wait_p50_ms": _rounded(percentile(traffic["waits"], 0.50)),
        "consent_wait_p95_ms": _rounded(percentile(traffic["waits"], 0.95)),
        "series": traffic["series"],
        "error_series": traffic["error_series"],
        "refused_series": traffic["refused_series"],
    }
