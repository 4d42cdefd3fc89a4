"""A forwarded call, top to bottom: admit -> connect -> decide -> exchange -> record.

`run_call` returns one `Outcome` (values.py): the result or the error, and the decision that
led to it; `forward` is what the method handlers call (the result, or the error raised).
"""

from __future__ import annotations

import time

from federation.router import Route
from federation.upstream.base import JsonDict
from fedmcp_lib import metrics
from identity.audit import Intent
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.admit import admit
from mcp_endpoint.pipeline.connect import connect
from mcp_endpoint.pipeline.decide import decide
from mcp_endpoint.pipeline.exchange import exchange, shape_result
from mcp_endpoint.pipeline.record import intend_call, metric_outcome, record_call
from mcp_endpoint.pipeline.upstream_requests import UpstreamCall, holds_input, upstream_input_resume
from mcp_endpoint.pipeline.values import CallSubject, Outcome


async def run_call(ctx: HostContext, route: Route, method: str, params: JsonDict) -> Outcome:
    """Forward one call to the route's peer, step by step, and record how it ended."""
    started = time.monotonic()
    subject = CallSubject.of(method, params)
    decision = ""
    intent: Intent | None = None
    try:
        # 1. Admit: loops and rate limits first, so neither can create prompts.
        hops = await admit(ctx, route)
        if holds_input(ctx, params):
            # The retry of a call whose upstream's sampling/elicitation requests were held for consent.
            call = UpstreamCall(route.peer.name, method, subject.name, arguments=subject.arguments)
            intent = intend_call(ctx, route.peer.name, subject, decision)
            await intent.written()
            held = await upstream_input_resume(ctx, call, params)
            result = shape_result(ctx, method, held.answer) if held.answer is not None else None
            outcome = Outcome(subject, held.word, result=result, error=held.refusal)
        else:
            # 2. Connect: the user's own account at a per-user OAuth peer.
            params, connecting = await connect(ctx, route.peer, params)
            if connecting is not None:
                outcome = Outcome(subject, result=connecting)
            else:
                # 3. Decide: policy, grants and consent. It may refuse, wait for the user, or
                #    answer a 2026-07-28 host with an input_required pointing at the consent page.
                verdict = await decide(ctx, route, subject, params)
                decision = verdict.word
                if not verdict.goes_on:
                    outcome = Outcome(subject, decision, result=verdict.answer, error=verdict.refusal)
                else:
                    # 4. Exchange: a peer gateway that owns the call may ask our user on the
                    #    way, whose answer is then the call's decision. Its intent row is
                    #    committed first: the upstream never runs a call the audit cannot account for.
                    intent = intend_call(ctx, route.peer.name, subject, decision)
                    await intent.written()
                    exchanged = await exchange(ctx, route, subject, verdict.params or params, hops, verdict.approval)
                    decision = exchanged.word or decision
                    outcome = Outcome(subject, decision, result=exchanged.answer, error=exchanged.refusal)
    except BaseException as exc:  # every ending is recorded; `Outcome.unwrap` raises it again
        outcome = Outcome(subject, decision, error=exc)
    # 5. Record.
    record_call(ctx, route.peer.name, outcome, started, intent)
    return outcome


@metrics.instrument_forward(metric_outcome)
async def forward(ctx: HostContext, route: Route, method: str, params: JsonDict) -> JsonDict:
    """Forward one call (`run_call`); return its result.

    Raises:
        JsonRpcError: the call was refused, or the upstream answered an error or could not be used.
    """
    return (await run_call(ctx, route, method, params)).unwrap()
