"""The admin's add-peer form follows `manage.py peer add`: the transport's own fields, a command
line for stdio, a clear error for what is missing, and no peer left behind that cannot be reached
(unless forced); the first connection is its first health check."""

from __future__ import annotations

import sys

import pytest

from federation.models import Peer, PeerHealthCheck
from tests.admin_ui.common import messages_of, staff_client
from tests.base import AsgiTestCase

ADD = "/admin/federation/peer/add/"
HTTP_FORM = {"transport": "streamable-http", "call_timeout": "20"}


@pytest.mark.usefixtures("everything_on_class")
class PeerAddFormTest(AsgiTestCase):
    everything_url: str

    def test_a_reachable_peer_is_added_with_its_catalog_and_a_health_check(self) -> None:
        client = staff_client()
        reply = client.post(ADD, {**HTTP_FORM, "name": "fx", "url": self.everything_url}, follow=True)

        peer = Peer.objects.get(name="fx")
        assert reply.redirect_chain[-1][0] == f"/admin/federation/peer/{peer.pk}/change/"
        levels = [level for level, _ in messages_of(reply)]
        assert "success" in levels and "error" not in levels, messages_of(reply)
        assert peer.catalog.filter(kind="tool", upstream_name="add").exists()
        assert PeerHealthCheck.objects.filter(peer=peer, ok=True).count() == 1
        assert peer.enabled

    def test_an_unreachable_peer_is_not_added_and_the_form_says_why(self) -> None:
        reply = staff_client().post(ADD, {**HTTP_FORM, "name": "gone", "url": "http://127.0.0.1:9/mcp"})

        assert reply.status_code == 200
        page = reply.content.decode()
        assert "Could not reach &#x27;gone&#x27;" in page and "The peer was not added" in page
        assert "added successfully" not in page
        assert not Peer.objects.filter(name="gone").exists()

    def test_forcing_keeps_an_unreachable_peer_with_a_warning(self) -> None:
        reply = staff_client().post(ADD, {**HTTP_FORM, "name": "later", "url": "http://127.0.0.1:9/mcp", "force": "on"}, follow=True)

        peer = Peer.objects.get(name="later")
        levels = [level for level, _ in messages_of(reply)]
        assert "error" in levels and "warning" in levels and "success" not in levels, messages_of(reply)
        assert PeerHealthCheck.objects.get(peer=peer).ok is False

    def test_an_http_peer_without_url_is_refused_on_the_url_field(self) -> None:
        reply = staff_client().post(ADD, {**HTTP_FORM, "name": "nourl"})

        assert reply.status_code == 200
        assert "needs the URL of its MCP endpoint" in str(reply.context["form"].errors["url"])
        assert not Peer.objects.exists()

    def test_a_stdio_peer_takes_a_command_line_like_the_cli(self) -> None:
        server = "tests/fixtures/everything_server.py"
        command = f"{sys.executable} {server} --stdio"
        form = {"transport": "stdio", "call_timeout": "20", "name": "local", "command": command, "url": "http://left.over/"}
        reply = staff_client().post(ADD, form, follow=True)

        peer = Peer.objects.get(name="local")
        assert (peer.command, peer.args, peer.url) == (sys.executable, [server, "--stdio"], "")
        assert peer.catalog.filter(kind="tool").exists(), messages_of(reply)

    def test_a_stdio_peer_that_fails_shows_what_it_wrote_to_stderr(self) -> None:
        command = f"{sys.executable} -c \"import sys; sys.stderr.write('npm error 404 Not Found: @nope/server\\n'); sys.exit(1)\""
        reply = staff_client().post(ADD, {"transport": "stdio", "call_timeout": "20", "name": "broken", "command": command})

        assert reply.status_code == 200
        assert "npm error 404 Not Found" in reply.content.decode()
        assert not Peer.objects.filter(name="broken").exists()

    def test_a_taken_name_is_refused_without_touching_the_existing_peer(self) -> None:
        Peer.objects.create(name="dup", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        reply = staff_client().post(ADD, {**HTTP_FORM, "name": "dup", "url": self.everything_url})

        assert reply.status_code == 200
        assert "already exists" in reply.content.decode()
        assert Peer.objects.get(name="dup").url == "http://127.0.0.1:9/mcp"

    def test_the_form_groups_fields_by_transport(self) -> None:
        page = staff_client().get(ADD).content.decode()

        assert 'data-transports="stdio"' in page and 'data-transports="streamable-http sse websocket"' in page
        assert 'name="command"' in page and 'name="force"' in page
