"""Tasks through the gateway (issue 17.3), from a host's side, against the fixture server's tasks.

A 2026-07-28 host that declares `io.modelcontextprotocol/tasks` gets the gateway's own task id
for a task the upstream created, polls it, answers its input and cancels it; another user, a
forged id and another peer's endpoint get -32602, as for a task that does not exist. A
2025-11-25 host does the same with that revision's experimental tasks against the
handshake-only fixture, and each user lists only their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.test import AsyncClient, override_settings

from federation.models import Transport
from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentPolicy
from mcp_endpoint import jsonrpc
from mcp_endpoint.tasks import TASKS_EXTENSION
from tests.base import BOB, AsgiTestCase, FixturePeerTestCase, McpClient, amint_token, register_peer
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message

SLOW = "everything__slow_compute"
CONFIRM = "everything__confirm_delete"
FAILING = "everything__failing_job"
TASKS = {"extensions": {TASKS_EXTENSION: {}}}
POLLS = 200


def result_of(reply: Any) -> dict[str, Any]:
    message = final_message(reply)
    assert "result" in message, message
    return message["result"]


def error_of(reply: Any) -> dict[str, Any]:
    message = final_message(reply)
    assert "error" in message, message
    return message["error"]


class TaskHost(FixturePeerTestCase):
    """A 2026-07-28 host that declares the tasks extension, and its steps (no tests of its own)."""

    def setUp(self) -> None:
        super().setUp()
        self.host = McpClient(capabilities=TASKS)

    async def create(self, client: McpClient, tool: str = SLOW, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        arguments = {"seconds": 0.2, "label": "answer"} if arguments is None else arguments
        created = result_of(await client.call_modern("tools/call", {"name": tool, "arguments": arguments}, name=tool))
        self.assertEqual(created["resultType"], "task", created)
        return created

    async def get(self, client: McpClient, task_id: str) -> dict[str, Any]:
        return result_of(await client.call_modern("tasks/get", {"taskId": task_id}, name=task_id))

    async def wait_for(self, client: McpClient, task_id: str, *statuses: str) -> dict[str, Any]:
        for _ in range(POLLS):
            task = await self.get(client, task_id)
            if task["status"] in statuses:
                return task
            await asyncio.sleep(0.05)
        self.fail(f"task never reached {statuses}: {task}")


class ModernTaskTests(TaskHost):
    async def test_a_task_is_created_polled_and_its_result_inlined_under_the_gateways_id(self) -> None:
        created = await self.create(self.host)

        task_id = created["taskId"]
        self.assertTrue(task_id.startswith("fedmcp-task:"), task_id)  # the gateway's id, not the upstream's
        self.assertEqual(created["status"], "working")
        self.assertIn("ttlMs", created)
        done = await self.wait_for(self.host, task_id, "completed", "failed", "cancelled")
        self.assertEqual((done["taskId"], done["status"], done["resultType"]), (task_id, "completed", "complete"))
        self.assertEqual(done["result"]["content"][0]["text"], "computed answer after 0.2s")
        await audit_flush()
        methods = [(e.method, e.peer, e.outcome) async for e in AuditEvent.objects.order_by("at")]
        self.assertEqual(methods[0], ("tools/call", "everything", "ok"))
        self.assertIn(("tasks/get", "everything", "ok"), methods)

    async def test_a_task_waiting_for_input_is_answered_with_tasks_update(self) -> None:
        task_id = (await self.create(self.host, CONFIRM, {"filename": "notes.txt"}))["taskId"]

        waiting = await self.wait_for(self.host, task_id, "input_required")
        (key, asked), = waiting["inputRequests"].items()
        self.assertEqual(asked["method"], "elicitation/create")
        ack = result_of(await self.host.call_modern(
            "tasks/update", {"taskId": task_id, "inputResponses": {key: {"action": "accept", "content": {"confirm": True}}}}, name=task_id
        ))
        self.assertEqual(ack, {"resultType": "complete", "_meta": ack["_meta"]})
        done = await self.wait_for(self.host, task_id, "completed", "failed", "cancelled")
        self.assertEqual(done["result"]["content"][0]["text"], "deleted notes.txt")

    async def test_with_the_shipped_elicitation_default_a_tasks_request_never_reaches_the_host_unasked(self) -> None:
        task_id = (await self.create(self.host, CONFIRM, {"filename": "notes.txt"}))["taskId"]
        await self.wait_for(self.host, task_id, "input_required")

        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="ask"):
            refused = error_of(await self.host.call_modern("tasks/get", {"taskId": task_id}, name=task_id))
        self.assertEqual(refused["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(refused["data"]["reason"], "task_input_not_allowed")
        self.assertIn("consent policy allows elicitation for peer 'everything'", refused["message"])

        # A policy that allows the peer's elicitations lets the same poll show the request.
        await ConsentPolicy.objects.acreate(peer="everything", kind="elicitation", decision="allow")
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="ask"):
            waiting = await self.get(self.host, task_id)
        self.assertEqual([r["method"] for r in waiting["inputRequests"].values()], ["elicitation/create"])

    async def test_tasks_cancel_stops_a_running_task(self) -> None:
        task_id = (await self.create(self.host, arguments={"seconds": 60, "label": "long"}))["taskId"]

        ack = result_of(await self.host.call_modern("tasks/cancel", {"taskId": task_id}, name=task_id))

        self.assertEqual(ack["resultType"], "complete")
        self.assertNotIn("taskId", ack)
        self.assertEqual((await self.get(self.host, task_id))["status"], "cancelled")

    async def test_another_user_can_neither_see_nor_cancel_the_task(self) -> None:
        task_id = (await self.create(self.host, arguments={"seconds": 60, "label": "alices"}))["taskId"]
        bob = McpClient(token=await amint_token(BOB), capabilities=TASKS)

        for method in ("tasks/get", "tasks/cancel"):
            error = error_of(await bob.call_modern(method, {"taskId": task_id}, name=task_id))
            self.assertEqual(error["code"], jsonrpc.INVALID_PARAMS, (method, error))
            self.assertNotIn("alices", str(error))

        self.assertEqual((await self.get(self.host, task_id))["status"], "working")  # still alice's, still running
        await self.host.call_modern("tasks/cancel", {"taskId": task_id}, name=task_id)

    async def test_a_forged_or_upstream_task_id_is_an_unknown_task(self) -> None:
        task_id = (await self.create(self.host))["taskId"]
        prefix, _, signed = task_id.rpartition(":")
        tampered = f"{prefix}:{signed[:-1]}{'A' if signed[-1] != 'A' else 'B'}"

        for forged in (tampered, f"{prefix}:eyJwIjoiZXZlcnl0aGluZyJ9", "plain-upstream-id", ""):
            error = error_of(await self.host.call_modern("tasks/get", {"taskId": forged}, name=forged or None))
            self.assertEqual(error["code"], jsonrpc.INVALID_PARAMS, forged)

    async def test_another_peers_endpoint_does_not_serve_the_task(self) -> None:
        await register_peer_async("beta", self.everything_url)
        task_id = (await self.create(self.host))["taskId"]

        beta = McpClient("/peers/beta/mcp", capabilities=TASKS)
        error = error_of(await beta.call_modern("tasks/get", {"taskId": task_id}, name=task_id))

        self.assertEqual(error["code"], jsonrpc.INVALID_PARAMS)
        own = McpClient("/peers/everything/mcp", capabilities=TASKS)
        self.assertEqual((await self.wait_for(own, task_id, "completed"))["status"], "completed")

    async def test_a_host_without_the_extension_gets_plain_calls_and_minus_32021_for_tasks(self) -> None:
        plain = McpClient()

        result = result_of(await plain.call_modern("tools/call", {"name": SLOW, "arguments": {"seconds": 0, "label": "sync"}}, name=SLOW))
        self.assertEqual((result["resultType"], result["content"][0]["text"]), ("complete", "computed sync after 0.0s"))
        required = error_of(await plain.call_modern("tools/call", {"name": FAILING, "arguments": {}}, name=FAILING))
        self.assertEqual(required["code"], jsonrpc.MISSING_REQUIRED_CLIENT_CAPABILITY)
        for method in ("tasks/get", "tasks/update", "tasks/cancel"):
            error = error_of(await plain.call_modern(method, {"taskId": "x", "inputResponses": {}}, name="x"))
            self.assertEqual(error["code"], jsonrpc.MISSING_REQUIRED_CLIENT_CAPABILITY, method)
            self.assertEqual(error["data"]["requiredCapabilities"], TASKS)

    async def test_removed_methods_and_bad_params_are_clear_errors(self) -> None:
        for method in ("tasks/result", "tasks/list"):
            error = error_of(await self.host.call_modern(method, {"taskId": "x"}))
            self.assertEqual(error["code"], jsonrpc.METHOD_NOT_FOUND, method)
        for params in ({}, {"taskId": 7}):
            self.assertEqual(error_of(await self.host.call_modern("tasks/get", params))["code"], jsonrpc.INVALID_PARAMS, params)
        self.assertEqual(error_of(await self.host.call_modern("tasks/update", {"taskId": "x"}, name="x"))["code"], jsonrpc.INVALID_PARAMS)

    async def test_an_mcp_name_header_naming_another_task_is_refused(self) -> None:
        task_id = (await self.create(self.host))["taskId"]

        reply = await self.host.call_modern("tasks/get", {"taskId": task_id}, name="some-other-task")

        self.assertEqual((reply.status, reply.error_code), (400, jsonrpc.HEADER_MISMATCH))

    async def test_the_extension_is_declared_where_a_peer_serves_it(self) -> None:
        for path in ("/mcp", "/peers/everything/mcp"):
            discovered = result_of(await McpClient(path).call_modern("server/discover"))
            self.assertEqual(discovered["capabilities"]["extensions"], {TASKS_EXTENSION: {}}, path)
            self.assertNotIn("tasks", discovered["capabilities"])

    async def test_a_denied_tool_creates_no_task(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="slow_compute", decision="deny")

        error = error_of(await self.host.call_modern("tools/call", {"name": SLOW, "arguments": {"seconds": 60}}, name=SLOW))

        self.assertEqual(error["code"], jsonrpc.CONSENT_DENIED)


async def register_peer_async(name: str, url: str) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(register_peer)(name, url, connect_timeout=10.0, call_timeout=20.0)


class TaskConsentTests(TaskHost):
    """With the shipped consent defaults: the call that creates a task is asked about, the polls are not."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_CONSENT_DEFAULT="ask-new-peers", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT))

    async def test_the_task_is_created_once_the_user_approved_the_call(self) -> None:
        params = {"name": SLOW, "arguments": {"seconds": 0.2, "label": "approved"}}

        asked = error_of(await self.host.call_modern("tools/call", params, name=SLOW, timeout=CALL_TIMEOUT))
        self.assertEqual(asked["code"], jsonrpc.CONSENT_REQUIRED)
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        path = "/" + asked["data"]["url"].split("/", 3)[3]
        self.assertEqual((await browser.post(path, {"action": "approve"})).status_code, 302)
        created = result_of(await self.host.call_modern("tools/call", params, name=SLOW, timeout=CALL_TIMEOUT))

        self.assertEqual(created["resultType"], "task")
        done = await self.wait_for(self.host, created["taskId"], "completed")
        self.assertEqual(done["result"]["content"][0]["text"], "computed approved after 0.2s")
        await audit_flush()
        rows = [(e.method, e.decision) async for e in AuditEvent.objects.order_by("at")]
        self.assertEqual(rows[:2], [("tools/call", "ask"), ("tools/call", "approved")])
        self.assertTrue(all(method == "tasks/get" for method, _ in rows[2:]))


class HandshakeEraTaskTests(FixturePeerTestCase):
    """2025-11-25's experimental tasks: the methods exist for that revision only; the ids are checked the same way."""

    async def test_tasks_methods_need_2025_11_25(self) -> None:
        older = McpClient()
        await older.initialize("2025-06-18")

        error = error_of(await older.call("tasks/get", {"taskId": "x"}))

        self.assertEqual(error["code"], jsonrpc.METHOD_NOT_FOUND)

    async def test_a_forged_task_id_is_an_unknown_task(self) -> None:
        host = McpClient()
        await host.initialize("2025-11-25")

        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            error = error_of(await host.call(method, {"taskId": "fedmcp-task:forged"}))
            self.assertEqual(error["code"], jsonrpc.INVALID_PARAMS, method)

    async def test_a_task_hint_to_an_upstream_without_tasks_runs_the_call_plainly(self) -> None:
        host = McpClient()
        await host.initialize("2025-11-25")

        result = result_of(await host.call("tools/call", {"name": "everything__add", "arguments": {"a": 2, "b": 3}, "task": {"ttl": 60000}}))

        self.assertEqual(result["content"][0]["text"], "5")
        self.assertNotIn("task", result)

    async def test_tasks_list_on_mcp_holds_no_task_of_a_peer_without_tasks(self) -> None:
        host = McpClient()
        await host.initialize("2025-11-25")

        self.assertEqual(result_of(await host.call("tasks/list", {})), {"tasks": []})


@pytest.mark.usefixtures("handshake_only_on_class", "everything_on_class")
class HandshakeEraTaskPassThroughTests(AsgiTestCase):
    """2025-11-25 tasks end to end, with the fixture over legacy HTTP+SSE (handshake era only) as peer `legacy`."""

    handshake_only_url: str
    everything_url: str

    def setUp(self) -> None:
        super().setUp()
        register_peer("legacy", self.handshake_only_url, transport=Transport.SSE, connect_timeout=10.0, call_timeout=20.0)

    async def host(self, path: str = "/mcp", token: str | None = None) -> McpClient:
        client = McpClient(path, token=token)
        self.capabilities = (await client.initialize("2025-11-25"))["capabilities"]
        return client

    async def create(self, client: McpClient, name: str = "legacy__slow_compute", seconds: float = 0.2) -> str:
        created = result_of(await client.call("tools/call", {"name": name, "arguments": {"seconds": seconds, "label": "old"}, "task": {"ttl": 60000}}))
        task_id = created["task"]["taskId"]
        self.assertTrue(task_id.startswith("fedmcp-task:"), created)
        return task_id

    async def test_a_task_is_created_polled_and_its_result_fetched(self) -> None:
        client = await self.host()
        self.assertEqual(self.capabilities["tasks"], {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}})

        task_id = await self.create(client)
        polled = result_of(await client.call("tasks/get", {"taskId": task_id}))
        self.assertEqual((polled["taskId"], polled["ttl"]), (task_id, 600000))
        done = result_of(await client.call("tasks/result", {"taskId": task_id}))

        self.assertEqual(done["content"][0]["text"], "computed old after 0.2s")
        self.assertEqual(done["_meta"]["io.modelcontextprotocol/related-task"], {"taskId": task_id})
        self.assertNotIn("resultType", done)
        listed = result_of(await client.call("tasks/list", {}))
        self.assertEqual([(t["taskId"], t["status"]) for t in listed["tasks"]], [(task_id, "completed")])

    async def test_each_user_lists_and_reaches_only_their_own_tasks(self) -> None:
        alice = await self.host()
        task_id = await self.create(alice, seconds=60)
        bob = await self.host("/peers/legacy/mcp", token=await amint_token(BOB))

        self.assertEqual(result_of(await bob.call("tasks/list", {})), {"tasks": []})
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            self.assertEqual(error_of(await bob.call(method, {"taskId": task_id}))["code"], jsonrpc.INVALID_PARAMS, method)

        cancelled = result_of(await alice.call("tasks/cancel", {"taskId": task_id}))
        self.assertEqual((cancelled["taskId"], cancelled["status"]), (task_id, "cancelled"))

    async def test_a_tool_that_requires_a_task_says_so_when_called_without(self) -> None:
        client = await self.host()

        error = error_of(await client.call("tools/call", {"name": "legacy__failing_job", "arguments": {}}))

        self.assertEqual(error["code"], jsonrpc.METHOD_NOT_FOUND)
        self.assertIn("requires task augmentation", error["message"])

    async def test_a_2026_task_id_is_not_served_to_a_handshake_era_host(self) -> None:
        await register_peer_async("everything", self.everything_url)
        modern = McpClient("/peers/everything/mcp", capabilities=TASKS)
        created = result_of(await modern.call_modern("tools/call", {"name": "slow_compute", "arguments": {"seconds": 0.2}}, name="slow_compute"))
        client = await self.host()

        error = error_of(await client.call("tasks/get", {"taskId": created["taskId"]}))

        self.assertEqual(error["code"], jsonrpc.INVALID_PARAMS)
