"""The peer page: Test (a health check now), Refresh, and its catalog readable with a switch per item."""

from __future__ import annotations

from asgiref.sync import sync_to_async

from federation.models import CatalogEntry, Peer, PeerHealthCheck
from tests.admin_ui.common import messages_of, staff_client
from tests.base import FixturePeerTestCase, McpClient

TOOL = "everything__add"


def tool_names(reply: object) -> set[str]:
    return {tool["name"] for tool in reply.json()["result"]["tools"]}  # type: ignore[attr-defined]


class PeerPageTest(FixturePeerTestCase):
    def page(self) -> str:
        return staff_client().get(f"/admin/federation/peer/{self.peer.pk}/change/").content.decode()

    def test_the_catalog_shows_descriptions_and_the_input_schema_as_a_table(self) -> None:
        page = self.page()
        add = CatalogEntry.objects.get(peer=self.peer, upstream_name="add")
        schema = add.payload["inputSchema"]

        assert f'id="catalog-{add.pk}"' in page
        assert add.payload["description"] in page
        assert '<table class="schema">' in page
        for argument in schema["properties"]:
            assert f"<code>{argument}</code>" in page
        assert 'id="peer-test"' in page and 'id="peer-refresh"' in page

    def test_test_checks_the_peer_now_and_says_how_it_went(self) -> None:
        before = PeerHealthCheck.objects.filter(peer=self.peer).count()
        reply = staff_client().post(f"/admin/federation/peer/{self.peer.pk}/test/", follow=True)

        assert [level for level, _ in messages_of(reply)] == ["success"], messages_of(reply)
        assert "reachable, answered in" in messages_of(reply)[0][1]
        assert PeerHealthCheck.objects.filter(peer=self.peer).count() == before + 1

    def test_test_of_an_unreachable_peer_records_and_shows_the_failure(self) -> None:
        gone = Peer.objects.create(name="gone", transport="streamable-http", url="http://127.0.0.1:9/mcp", connect_timeout=2)
        reply = staff_client().post(f"/admin/federation/peer/{gone.pk}/test/", follow=True)

        assert [level for level, _ in messages_of(reply)][0] == "error"
        assert PeerHealthCheck.objects.get(peer=gone).ok is False

    def test_refresh_lists_the_catalog_again(self) -> None:
        CatalogEntry.objects.filter(peer=self.peer, upstream_name="add").delete()
        reply = staff_client().post(f"/admin/federation/peer/{self.peer.pk}/refresh/", follow=True)

        assert "success" in [level for level, _ in messages_of(reply)], messages_of(reply)
        assert CatalogEntry.objects.filter(peer=self.peer, upstream_name="add").exists()

    def test_test_and_refresh_need_a_post(self) -> None:
        client = staff_client()
        assert client.get(f"/admin/federation/peer/{self.peer.pk}/test/").status_code == 403
        assert client.get(f"/admin/federation/peer/{self.peer.pk}/refresh/").status_code == 403

    async def test_switching_an_item_off_hides_it_from_hosts_and_calls(self) -> None:
        entry = await CatalogEntry.objects.aget(peer=self.peer, upstream_name="add")
        admin = await sync_to_async(staff_client)()
        url = f"/admin/federation/peer/{self.peer.pk}/catalog/{entry.pk}/switch/"

        reply = await sync_to_async(admin.post)(url, {"enabled": "0"}, follow=True)
        assert reply.status_code == 200

        client = McpClient()
        await client.initialize()
        assert TOOL not in tool_names(await client.call("tools/list"))
        refused = (await client.call("tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 2}})).json()
        assert refused.get("error"), refused

        await sync_to_async(admin.post)(url, {"enabled": "1"})
        assert TOOL in tool_names(await client.call("tools/list"))

    def test_a_catalog_entry_page_shows_the_schema_as_a_table(self) -> None:
        entry = CatalogEntry.objects.get(peer=self.peer, upstream_name="add")
        page = staff_client().get(f"/admin/federation/catalogentry/{entry.pk}/change/").content.decode()

        assert '<table class="schema">' in page and entry.payload["description"] in page
        for argument in entry.payload["inputSchema"]["properties"]:
            assert f"<code>{argument}</code>" in page


class PeerChangeFormTest(FixturePeerTestCase):
    def change(self, peer: Peer, **fields: str) -> object:
        form = {
            "name": peer.name, "transport": peer.transport, "enabled": "on", "url": peer.url, "command_line": "",
            "max_processes": "8", "connect_timeout": "10", "call_timeout": "20",
            "health_checks-TOTAL_FORMS": "0", "health_checks-INITIAL_FORMS": "0", "health_checks-MIN_NUM_FORMS": "0",
            "health_checks-MAX_NUM_FORMS": "0", **fields,
        }
        return staff_client().post(f"/admin/federation/peer/{peer.pk}/change/", form)

    def test_a_stdio_peer_is_edited_as_one_command_line(self) -> None:
        peer = Peer.objects.create(name="local", transport="stdio", command="uvx", args=["mcp-server-time", "--tz", "Europe/Oslo"])
        page = staff_client().get(f"/admin/federation/peer/{peer.pk}/change/").content.decode()
        assert 'value="uvx mcp-server-time --tz Europe/Oslo"' in page
        assert 'class="module aligned fedmcp-stdio' in page and 'class="module aligned fedmcp-http' in page

        reply = self.change(peer, url="", command_line="no-such-fedmcp-server -y '@scope/server' --flag 'two words'")

        assert reply.status_code == 302, reply.context["adminform"].form.errors
        peer.refresh_from_db()
        assert (peer.command, peer.args) == ("no-such-fedmcp-server", ["-y", "@scope/server", "--flag", "two words"])

    def test_an_http_peer_without_url_is_refused(self) -> None:
        reply = self.change(self.peer, url="")

        assert reply.status_code == 200
        assert "needs the URL" in " ".join(reply.context["adminform"].form.errors["url"])
        assert Peer.objects.get(pk=self.peer.pk).url
