"""Disabling a catalog item in the admin hides it from hosts and tells connected ones (list_changed)."""

from __future__ import annotations

from asgiref.sync import sync_to_async

from federation.models import CatalogEntry
from tests.admin_ui.common import messages_of, staff_client
from tests.base import FixturePeerTestCase, HttpExchange, McpClient

TOOL = "everything__add"


def tool_names(reply: object) -> set[str]:
    return {tool["name"] for tool in reply.json()["result"]["tools"]}  # type: ignore[attr-defined]


class CatalogAdminTest(FixturePeerTestCase):
    async def test_disabling_a_tool_removes_it_from_tools_list_and_sends_list_changed(self) -> None:
        client = McpClient()
        await client.initialize()
        assert TOOL in tool_names(await client.call("tools/list"))
        entry = await CatalogEntry.objects.aget(peer=self.peer, kind="tool", upstream_name="add")
        admin = await sync_to_async(staff_client)()

        async with HttpExchange("GET", "/mcp", client.headers({"accept": "text/event-stream"})) as stream:
            assert await stream.start() == 200
            reply = await sync_to_async(admin.post)(
                "/admin/federation/catalogentry/", {"action": "disable_entries", "_selected_action": [entry.pk]}, follow=True
            )
            assert reply.status_code == 200
            assert [level for level, _ in messages_of(reply)] == ["success"]
            note = await stream.next_event()

        assert note is not None and note["method"] == "notifications/tools/list_changed"
        assert TOOL not in tool_names(await client.call("tools/list"))
        assert (await client.call("tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 2}})).json().get("error")

    async def test_enabling_it_again_brings_it_back(self) -> None:
        entry = await CatalogEntry.objects.aget(peer=self.peer, kind="tool", upstream_name="add")
        admin = await sync_to_async(staff_client)()
        await sync_to_async(admin.post)("/admin/federation/catalogentry/", {"action": "disable_entries", "_selected_action": [entry.pk]})
        await sync_to_async(admin.post)("/admin/federation/catalogentry/", {"action": "enable_entries", "_selected_action": [entry.pk]})

        client = McpClient()
        await client.initialize()
        assert TOOL in tool_names(await client.call("tools/list"))

    def test_the_catalog_list_searches_by_name(self) -> None:
        page = staff_client().get("/admin/federation/catalogentry/", {"q": "everything__add"})

        assert page.status_code == 200
        assert b"everything__add" in page.content
        assert b"everything__echo" not in page.content
