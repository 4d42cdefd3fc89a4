"""Step 5: the audit row of a forwarded call, and of each request an upstream made during it.

Before step 4 sends a call upstream, `intend_call` commits its intent row (identity/audit.py):
a worker killed mid-call leaves it, and another worker writes the call's row as `interrupted`.
"""

from __future__ import annotations

import time

from federation.health import CircuitOpenError
from identity.audit import Intent, audit_intent, audit_record
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.values import CallSubject, Outcome


def intend_call(ctx: HostContext, peer: str, subject: CallSubject, decision: str) -> Intent:
    """Start the intent row of a call about to go upstream; the caller awaits `written()` before sending it."""
    return audit_intent(
        identity=ctx.identity, peer=peer, method=subject.method, name=subject.name, decision=decision, arguments=subject.audited_arguments
    )


def record_call(ctx: HostContext, peer: str, outcome: Outcome, started: float, intent: Intent | None = None) -> None:
    """Queue the audit row of one forwarded call: who, what, the decision and how it ended (completing its intent)."""
    subject = outcome.subject
    audit_record(
        identity=ctx.identity,
        peer=peer,
        method=subject.method,
        name=subject.name,
        error_code=outcome.error_code,
        latency_ms=(time.monotonic() - started) * 1000,
        decision=outcome.decision,
        # Not `ok`: nothing ran yet, or not to the end (docs/CONSENT.md "Outcomes").
        input_required=outcome.input_required,
        arguments=subject.audited_arguments,
        intent=intent,
    )


def record_request(
    ctx: HostContext, peer: str, call_name: str, method: str, decision: str, error_code: int | None, started: float, *, input_required: bool = False
) -> None:
    """Queue the audit row of a sampling/elicitation request an upstream sent during the call `call_name`."""
    audit_record(
        identity=ctx.identity, peer=peer, method=method, name=call_name,
        error_code=error_code, latency_ms=(time.monotonic() - started) * 1000, decision=decision, input_required=input_required,
    )


def metric_outcome(exc: Exception) -> str:
    """The `outcome` label of fedmcp_forwarded_calls_total for a call that raised `exc` (fedmcp_lib/metrics.py)."""
    if isinstance(exc, jsonrpc.RateLimitedError):
        return "rate_limited"
    if isinstance(exc, jsonrpc.CancelledError):
        return "cancelled"
    if isinstance(exc, jsonrpc.UpstreamFailedError):
        return "circuit_open" if isinstance(exc.__cause__, CircuitOpenError) else "unavailable"
    if isinstance(exc, jsonrpc.JsonRpcError):
        return "error"
    return "internal"

