"""Peers in the admin: adding one runs a connection test that stores and shows its catalog."""

from __future__ import annotations

import pytest

from federation.health import breakers
from federation.models import CatalogEntry, Peer, PeerHealthCheck
from tests.admin_ui.common import messages_of, staff_client
from tests.base import AsgiTestCase

ADD_FORM = {
    "transport": "streamable-http", "enabled": "on", "args": "[]", "max_processes": "8",
    "connect_timeout": "10", "call_timeout": "20",
    "catalog-TOTAL_FORMS": "0", "catalog-INITIAL_FORMS": "0", "catalog-MIN_NUM_FORMS": "0", "catalog-MAX_NUM_FORMS": "1000",
    "health_checks-TOTAL_FORMS": "0", "health_checks-INITIAL_FORMS": "0", "health_checks-MIN_NUM_FORMS": "0",
    "health_checks-MAX_NUM_FORMS": "0",
}


@pytest.mark.usefixtures("everything_on_class")
class PeerAdminTest(AsgiTestCase):
    everything_url: str

    def test_adding_a_peer_tests_the_connection_and_shows_its_tools(self) -> None:
        client = staff_client()
        reply = client.post("/admin/federation/peer/add/", {**ADD_FORM, "name": "fx", "url": self.everything_url}, follow=True)

        assert reply.status_code == 200
        levels = [level for level, _ in messages_of(reply)]
        assert "success" in levels and "error" not in levels, messages_of(reply)
        peer = Peer.objects.get(name="fx")
        assert peer.catalog.filter(kind="tool", upstream_name="add").exists()
        page = client.get(f"/admin/federation/peer/{peer.pk}/change/")
        assert b"fx__add" in page.content
        assert b"health history" in page.content.lower()

    def test_the_refresh_action_syncs_and_reports_counts(self) -> None:
        client = staff_client()
        client.post("/admin/federation/peer/add/", {**ADD_FORM, "name": "fx", "url": self.everything_url})
        peer = Peer.objects.get(name="fx")
        CatalogEntry.objects.filter(peer=peer, upstream_name="add").delete()

        reply = client.post("/admin/federation/peer/", {"action": "refresh_catalog", "_selected_action": [peer.pk]}, follow=True)

        assert reply.status_code == 200
        levels = {level for level, _ in messages_of(reply)}
        assert levels == {"success"}, messages_of(reply)
        assert peer.catalog.filter(upstream_name="add").exists()

    def test_enable_and_disable_actions_switch_peers(self) -> None:
        client = staff_client()
        peer = Peer.objects.create(name="off", transport="streamable-http", url="http://127.0.0.1:9/mcp")

        client.post("/admin/federation/peer/", {"action": "disable_peers", "_selected_action": [peer.pk]})
        assert not Peer.objects.get(pk=peer.pk).enabled
        client.post("/admin/federation/peer/", {"action": "enable_peers", "_selected_action": [peer.pk]})
        assert Peer.objects.get(pk=peer.pk).enabled

    def test_the_list_shows_health_and_this_workers_circuit(self) -> None:
        peer = Peer.objects.create(name="seen", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        PeerHealthCheck.objects.create(peer=peer, ok=False, error="refused")
        page = staff_client().get("/admin/federation/peer/")

        assert page.status_code == 200
        assert b"failing" in page.content
        assert b"this worker" in page.content
        assert peer.pk not in breakers.states()

    def test_secrets_are_never_rendered(self) -> None:
        peer = Peer.objects.create(
            name="gw", transport="streamable-http", url="http://127.0.0.1:9/mcp", client_id="id", client_secret="s3cr3t-value",
            env={"TOKEN": "env-value"},
        )
        page = staff_client().get(f"/admin/federation/peer/{peer.pk}/change/")

        assert page.status_code == 200
        assert b"s3cr3t-value" not in page.content and b"env-value" not in page.content


class PeerAdminDeleteTest(AsgiTestCase):
    def test_deleting_a_peer_from_the_admin_removes_it_and_its_catalog(self) -> None:
        peer = Peer.objects.create(name="old", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        CatalogEntry.objects.create(peer=peer, kind="tool", upstream_name="x", name="old__x", home="old")
        reply = staff_client().post(f"/admin/federation/peer/{peer.pk}/delete/", {"post": "yes"}, follow=True)

        assert reply.status_code == 200
        assert not Peer.objects.filter(pk=peer.pk).exists()
        assert not CatalogEntry.objects.filter(name="old__x").exists()
