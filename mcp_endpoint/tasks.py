"""Tasks through the gateway: task-augmented tools/call, and the tasks/* methods routed to the task's peer.

Two wire generations, each passed through to an upstream of the host's own era:

* 2026-07-28, the tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663): a host that
  declares the extension in its `clientCapabilities` may get a `CreateTaskResult`
  (`resultType: "task"`, the task at the top level) from `tools/call`, then polls `tasks/get`
  (the result, error or `inputRequests` inlined), answers with `tasks/update` and stops it with
  `tasks/cancel`. `tasks/result` and `tasks/list` do not exist in this era (-32601).
* 2025-11-25, experimental tasks: the host asks for a task with `task` in the `tools/call`
  params and gets `{task: {...}}`, then `tasks/get`, `tasks/result`, `tasks/cancel` and
  `tasks/list`.

The host never sees an upstream's task id. It gets the gateway's own (`task_id_issue`): a
signed id naming the peer, the user and the era with the upstream's id, so a tasks/* call
goes to the peer that owns the task, and an id of another user, another peer (on a per-peer
endpoint), another era or no signature at all is answered as an unknown task (-32602), the
same answer as for a task that does not exist, so ids cannot be probed. Nothing is stored: any
worker can route any task. Each tasks/* call goes through the call pipeline (admit, decide,
exchange, record) like every other forwarded call, so it is rate limited and in the audit log;
consent is asked once, for the tools/call that created the task; a 2026-07-28 task's own
sampling/elicitation requests reach the host only where consent allows them unasked
(`_gate_input_requests`).
"""

from __future__ import annotations

from typing import Any

from django.core import signing

from federation import catalog
from federation.router import Route, peer_for_scope
from fedmcp_lib.json_types import JsonDict
from identity.consent.decisions import consent_decide
from identity.consent.policy import REQUEST_KIND_FOR_METHOD
from identity.models import ConsentDecision
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.flow import forward

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
RELATED_TASK_META_KEY = "io.modelcontextprotocol/related-task"
MODERN_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
"""The tasks extension's methods (2026-07-28), validated here: the official models do not know them."""
LEGACY_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})
LEGACY_VERSION = "2025-11-25"
"""The one handshake-era revision with (experimental) tasks."""
TASK_ID_KIND = "task"
_SALT = "fedmcp.task-id"


# --- ids -------------------------------------------------------------------------------------


def _who(ctx: HostContext) -> str:
    return ctx.identity.subject_key() if ctx.identity is not None else ""


def task_id_issue(ctx: HostContext, peer: str, upstream_id: str) -> str:
    """The id the host gets for the upstream's task `upstream_id` at `peer`.

    The same every time (no timestamp): tasks/list names a task by the id its tools/call gave.
    """
    data = {"p": peer, "u": _who(ctx), "e": ctx.era, "t": upstream_id}
    return request_states.prefix(TASK_ID_KIND) + signing.Signer(salt=_SALT).sign_object(data, compress=True)


def _unknown(task_id: Any) -> jsonrpc.InvalidParamsError:
    return jsonrpc.InvalidParamsError("Unknown task: pass a taskId this gateway gave you", {"taskId": task_id})


def task_id_read(ctx: HostContext, task_id: Any) -> tuple[str, str]:
    """Return (peer, upstream task id) for a task id the host got from `task_id_issue`.

    Raises:
        InvalidParamsError: not one of this gateway's task ids, or not the caller's, or of
            another peer than this endpoint's, or of the other era.
    """
    if not isinstance(task_id, str) or not request_states.is_ours(TASK_ID_KIND, task_id):
        raise _unknown(task_id)
    try:
        data = signing.Signer(salt=_SALT).unsign_object(task_id.removeprefix(request_states.prefix(TASK_ID_KIND)))
    except signing.BadSignature as exc:
        raise _unknown(task_id) from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("p", "u", "e", "t")):
        raise _unknown(task_id)
    if data["u"] != _who(ctx) or data["e"] != ctx.era or (ctx.scope and data["p"] != ctx.scope):
        raise _unknown(task_id)
    return data["p"], data["t"]


def issue_in_call_result(ctx: HostContext, peer: str, result: JsonDict) -> JsonDict:
    """Replace the upstream's task id in a tools/call result that created a task with the host's own.

    2026-07-28: `resultType: "task"` with the task at the top level; 2025-11-25: `{task: {...}}`.
    """
    if ctx.era == "modern":
        if result.get("resultType") == "task" and isinstance(result.get("taskId"), str):
            result["taskId"] = task_id_issue(ctx, peer, result["taskId"])
        return result
    task = result.get("task")
    if isinstance(task, dict) and isinstance(task.get("taskId"), str):
        result["task"] = {**task, "taskId": task_id_issue(ctx, peer, task["taskId"])}
    return result


# --- what the host may do --------------------------------------------------------------------


def host_speaks_tasks(ctx: HostContext) -> bool:
    """Whether the host negotiated tasks for this request: the extension (2026-07-28), 2025-11-25 (handshake era)."""
    if ctx.era == "modern":
        return ctx.has_capability("extensions", TASKS_EXTENSION)
    return ctx.protocol_version == LEGACY_VERSION


def call_params(ctx: HostContext, params: JsonDict) -> JsonDict:
    """The tools/call params to forward: a 2026-07-28 host's leftover 2025 `task` hint is dropped.

    SEP-2663 lets the server alone decide whether a call becomes a task; the old hint must not
    turn into a 2025-style task at a handshake-era upstream the call is bridged to.
    """
    if ctx.era == "modern" and "task" in params:
        return {key: value for key, value in params.items() if key != "task"}
    return params


def check_request(ctx: HostContext, method: str, params: JsonDict) -> None:
    """Refuse a tasks/* request the host may not make, or whose params are malformed.

    Raises:
        MethodNotFoundError: a handshake-era host before 2025-11-25.
        JsonRpcError: -32021 for a 2026-07-28 host that did not declare the tasks extension.
        InvalidParamsError: taskId (or inputResponses, cursor) missing or of the wrong type.
    """
    if not host_speaks_tasks(ctx):
        if ctx.era == "legacy":
            raise jsonrpc.MethodNotFoundError(f"Method not found: {method} (tasks need protocol {LEGACY_VERSION})", {"method": method})
        raise jsonrpc.JsonRpcError(
            f"{method} needs the {TASKS_EXTENSION} extension: declare it in your clientCapabilities",
            {"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}},
            code=jsonrpc.MISSING_REQUIRED_CLIENT_CAPABILITY,
        )
    if method == "tasks/list":
        if params.get("cursor") is not None and not isinstance(params["cursor"], str):
            raise jsonrpc.InvalidParamsError("Invalid params for tasks/list: cursor must be a string")
        return
    if not isinstance(params.get("taskId"), str):
        raise jsonrpc.InvalidParamsError(f"Invalid params for {method}: taskId must be a string", [{"field": "taskId", "problem": "required string"}])
    if method == "tasks/update" and not isinstance(params.get("inputResponses"), dict):
        raise jsonrpc.InvalidParamsError(
            "Invalid params for tasks/update: inputResponses must be an object", [{"field": "inputResponses", "problem": "required object"}]
        )


# --- the methods -----------------------------------------------------------------------------


async def _task_route(ctx: HostContext, task_id: Any) -> tuple[Route, str]:
    peer_name, upstream_id = task_id_read(ctx, task_id)
    peer = await peer_for_scope(peer_name)
    if peer is None:
        raise _unknown(task_id)  # the peer was removed or disabled: its tasks are gone with it
    return Route(peer, upstream_id), upstream_id


async def routed(ctx: HostContext, params: JsonDict, method: str) -> JsonDict:
    """tasks/get, tasks/update, tasks/cancel, tasks/result: forwarded to the peer that owns the task."""
    check_request(ctx, method, params)
    host_id = params["taskId"]
    route, upstream_id = await _task_route(ctx, host_id)
    result = await forward(ctx, route, method, {**params, "taskId": upstream_id})
    await _gate_input_requests(ctx, route.peer.name, result)
    return _with_host_id(result, host_id)


async def _gate_input_requests(ctx: HostContext, peer: str, result: JsonDict) -> None:
    """Refuse a 2026-07-28 task's inlined sampling/elicitation requests unless consent allows them unasked.

    A handshake-era task's requests come during `tasks/result`, through the consent gate of
    every relayed request. A 2026-07-28 task shows them in each `tasks/get` poll, where the
    gateway cannot hold a question across polls yet: it passes them only where a policy (or
    the default) allows them, and otherwise answers the poll with -32017, naming the policy
    that would let them through; the host never sees a request nobody allowed.

    Raises:
        ConsentDeniedError: a request of the task's is not allowed unasked.
    """
    requests = result.get("inputRequests")
    if not isinstance(requests, dict):
        return
    for request in requests.values():
        method = request.get("method") if isinstance(request, dict) else None
        kind = REQUEST_KIND_FOR_METHOD.get(method) if isinstance(method, str) else None
        if kind is None:
            continue
        decision = await consent_decide(identity=ctx.identity, peer=peer, kind=kind, name="")
        if decision.action != ConsentDecision.ALLOW:
            raise jsonrpc.ConsentDeniedError(
                f"A task on peer '{peer}' asks for a {kind} request, which this gateway passes to a task's host only "
                f"when a consent policy allows {kind} for peer '{peer}' (it cannot ask about a task's requests yet)",
                {"reason": "task_input_not_allowed", "kind": kind, "peer": peer},
            )


def _with_host_id(result: JsonDict, host_id: str) -> JsonDict:
    """Put the id the host holds wherever a tasks/* result names the task (never a second signature of it)."""
    if isinstance(result.get("taskId"), str):
        result["taskId"] = host_id
    task = result.get("task")
    if isinstance(task, dict) and "taskId" in task:
        result["task"] = {**task, "taskId": host_id}
    meta = result.get("_meta")
    related = meta.get(RELATED_TASK_META_KEY) if isinstance(meta, dict) else None
    if isinstance(related, dict) and "taskId" in related:
        result["_meta"] = {**meta, RELATED_TASK_META_KEY: {**related, "taskId": host_id}}  # type: ignore[dict-item]
    return result


async def tasks_get(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await routed(ctx, params, "tasks/get")


async def tasks_update(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await routed(ctx, params, "tasks/update")


async def tasks_cancel(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await routed(ctx, params, "tasks/cancel")


async def tasks_result(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await routed(ctx, params, "tasks/result")


async def tasks_list(ctx: HostContext, params: JsonDict) -> JsonDict:
    """tasks/list (2025-11-25): the caller's tasks at this endpoint's peer, or at every peer that lists tasks.

    An upstream lists the tasks of the session that asks, and the gateway asks on the
    caller's own upstream session (federation/pool.py `connection_owner`), so the list holds
    the caller's tasks only. On /mcp the first page of each peer is merged (no `nextCursor`);
    a per-peer endpoint passes the upstream's cursor through.
    """
    check_request(ctx, "tasks/list", params)
    names = [ctx.scope] if ctx.scope else await catalog.peers_with_capability("tasks", "list")
    tasks: list[JsonDict] = []
    next_cursor: str | None = None
    for name in names:
        peer = await peer_for_scope(name)
        if peer is None:
            continue
        sent = params if ctx.scope else {key: value for key, value in params.items() if key != "cursor"}
        try:
            result = await forward(ctx, Route(peer, ""), "tasks/list", sent)
        except jsonrpc.JsonRpcError:
            if ctx.scope:
                raise
            continue  # one peer down or refusing: the others' tasks are still the caller's
        for task in result.get("tasks") or []:
            if isinstance(task, dict) and isinstance(task.get("taskId"), str):
                tasks.append({**task, "taskId": task_id_issue(ctx, name, task["taskId"])})
        if ctx.scope and isinstance(result.get("nextCursor"), str):
            next_cursor = result["nextCursor"]
    listed: JsonDict = {"tasks": tasks}
    if next_cursor is not None:
        listed["nextCursor"] = next_cursor
    return listed


HANDLERS = {
    "tasks/get": tasks_get,
    "tasks/update": tasks_update,
    "tasks/cancel": tasks_cancel,
    "tasks/result": tasks_result,
    "tasks/list": tasks_list,
}
