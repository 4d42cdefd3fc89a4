"""What the API endpoints do: peers with a connection test, catalog switches hosts hear about, audit filters."""

from __future__ import annotations

from datetime import timedelta
from datetime import timezone as dt_timezone

from asgiref.sync import sync_to_async

from federation.models import CatalogEntry, Peer
from identity.hostauth import scopes
from identity.models import AuditEvent
from tests.api.common import ApiTestCase, api_client
from tests.base import FixturePeerTestCase, HttpExchange, McpClient, mint_token, persona


def admin_client() -> object:
    user = persona("root")
    user.is_staff = True
    user.save()
    return api_client(mint_token("root", scope=scopes.ADMIN))


class PeerApiWithUpstreamTest(FixturePeerTestCase):
    def test_creating_a_peer_runs_the_connection_test_and_reports_counts(self) -> None:
        api = admin_client()
        reply = api.post("/api/peers/", {"name": "fx", "url": self.everything_url}, content_type="application/json")  # type: ignore[attr-defined]

        assert reply.status_code == 201
        body = reply.json()
        assert body["sync"]["ok"] is True and body["sync"]["counts"]["tool"] > 0
        assert body["peer"]["catalog_size"] > 0
        assert "client_secret" not in body["peer"]

    def test_refresh_returns_the_sync_report(self) -> None:
        api = admin_client()
        reply = api.post(f"/api/peers/{self.peer.pk}/refresh/")  # type: ignore[attr-defined]
        assert reply.status_code == 200 and reply.json()["ok"] is True

    async def test_disabling_through_the_api_hides_the_tool_and_sends_list_changed(self) -> None:
        client = McpClient()
        await client.initialize()
        entry = await CatalogEntry.objects.aget(peer=self.peer, kind="tool", upstream_name="add")
        api = await sync_to_async(admin_client)()

        async with HttpExchange("GET", "/mcp", client.headers({"accept": "text/event-stream"})) as stream:
            assert await stream.start() == 200
            reply = await sync_to_async(api.post)(f"/api/catalog/{entry.pk}/disable/")  # type: ignore[attr-defined]
            assert reply.status_code == 200 and reply.json()["enabled"] is False
            note = await stream.next_event()

        assert note is not None and note["method"] == "notifications/tools/list_changed"
        tools = {t["name"] for t in (await client.call("tools/list")).json()["result"]["tools"]}
        assert "everything__add" not in tools


class PeerApiTest(ApiTestCase):
    def test_it_lists_retrieves_updates_and_deletes_peers(self) -> None:
        listed = self.api.get("/api/peers/").json()
        assert [p["name"] for p in listed["results"]] == ["files"]
        assert listed["results"][0]["has_client_secret"] is True
        assert listed["results"][0]["env_names"] == ["API_KEY"]
        assert "peer-secret-value" not in str(listed) and "env-secret-value" not in str(listed)

        assert self.api.get(f"/api/peers/{self.peer.pk}/").json()["name"] == "files"
        updated = self.api.patch(f"/api/peers/{self.peer.pk}/", {"enabled": False, "call_timeout": 5}, content_type="application/json")
        assert updated.status_code == 200 and updated.json()["enabled"] is False and updated.json()["call_timeout"] == 5
        assert self.api.delete(f"/api/peers/{self.peer.pk}/").status_code == 204
        assert not Peer.objects.exists()
        assert self.api.get(f"/api/peers/{self.peer.pk}/").status_code == 404

    def test_it_refuses_an_invalid_peer_with_400(self) -> None:
        assert self.post_json("/api/peers/", {"name": "Bad Name", "url": "http://127.0.0.1:9/mcp", "sync": False}).status_code == 400
        assert self.post_json("/api/peers/", {"name": "nourl", "sync": False}).status_code == 400
        assert self.post_json("/api/peers/", {"name": "files", "url": "http://127.0.0.1:9/mcp", "sync": False}).status_code == 400

    def test_an_unreachable_peer_is_created_with_the_error_in_the_report(self) -> None:
        reply = self.post_json("/api/peers/", {"name": "gone", "url": "http://127.0.0.1:9/mcp"})
        assert reply.status_code == 201
        assert reply.json()["sync"]["ok"] is False and "connect" in reply.json()["sync"]["errors"]


class CatalogApiTest(ApiTestCase):
    def test_it_filters_by_peer_kind_enabled_and_text(self) -> None:
        def names(**query: str) -> list[str]:
            return [e["name"] for e in self.api.get("/api/catalog/", query).json()["results"]]

        assert names(kind="tool") == ["files__read"]
        assert names(q="summ") == ["files__summarise"]
        assert names(peer="other") == []
        self.post_json(f"/api/catalog/{self.prompt.pk}/disable/", {})
        assert names(enabled="false") == ["files__summarise"]
        self.post_json(f"/api/catalog/{self.prompt.pk}/enable/", {})
        assert names(enabled="false") == []

    def test_switching_an_unknown_item_is_404(self) -> None:
        assert self.post_json("/api/catalog/999999/disable/", {}).status_code == 404


class AuditApiTest(ApiTestCase):
    def test_it_filters_by_user_peer_method_outcome_and_time(self) -> None:
        def users(**query: str) -> list[str]:
            reply = self.api.get("/api/audit/", query)
            assert reply.status_code == 200
            return sorted(e["username"] for e in reply.json()["results"])

        first = AuditEvent.objects.get(username="alice")
        assert users() == ["alice", "bob"]
        assert users(user="bob") == ["bob"]
        assert users(outcome="error") == ["bob"]
        assert users(peer="files", method="tools/call") == ["alice", "bob"]
        assert users(method="prompts/get") == []
        assert users(until=first.at.isoformat()) == []
        assert users(since=first.at.isoformat()) == ["alice", "bob"]
        assert self.api.get("/api/audit/", {"since": "yesterday"}).status_code == 400

    def test_since_and_until_with_any_offset_are_read_as_the_same_instant(self) -> None:
        # -20:00 is a valid ISO 8601 offset that PostgreSQL refuses to take (it allows up to 15:59).
        first = AuditEvent.objects.get(username="alice").at
        far_west = (first - timedelta(hours=20)).replace(tzinfo=dt_timezone(timedelta(hours=-20)))
        naive_utc = first.replace(tzinfo=None)
        for query in ({"until": far_west.isoformat()}, {"until": naive_utc.isoformat()}):
            reply = self.api.get("/api/audit/", query)
            assert reply.status_code == 200, (query, reply.content)
            assert reply.json()["count"] == 0, query
        assert self.api.get("/api/audit/", {"since": far_west.isoformat()}).json()["count"] == 2

    def test_a_time_that_does_not_exist_or_leaves_the_calendar_in_utc_is_refused_with_400(self) -> None:
        for query in ({"since": "2020-02-30T00:00:00Z"}, {"until": "9999-12-31T23:59:59-20:00"}, {"since": "0001-01-01T00:00:00+05:00"}):
            reply = self.api.get("/api/audit/", query)
            assert reply.status_code == 400, (query, reply.content)
            assert list(reply.json()) == list(query), query

    def test_it_paginates(self) -> None:
        page = self.api.get("/api/audit/", {"page_size": 1}).json()
        assert page["count"] == 2 and len(page["results"]) == 1 and page["next"]


class ConsentApiTest(ApiTestCase):
    def test_policies_can_be_created_listed_changed_and_deleted(self) -> None:
        created = self.post_json("/api/policies/", {"peer": "files", "name_pattern": "delete*", "decision": "deny", "group": None})
        assert created.status_code == 201
        policy_id = created.json()["id"]
        assert {p["decision"] for p in self.api.get("/api/policies/").json()["results"]} == {"ask", "deny"}
        changed = self.api.patch(f"/api/policies/{policy_id}/", {"decision": "allow"}, content_type="application/json")
        assert changed.status_code == 200 and changed.json()["decision"] == "allow"
        assert self.post_json("/api/policies/", {"decision": "maybe"}).status_code == 400
        assert self.api.delete(f"/api/policies/{policy_id}/").status_code == 204
        assert self.api.get(f"/api/policies/{policy_id}/").status_code == 404

    def test_grants_are_listed_and_revoked(self) -> None:
        listed = self.api.get("/api/grants/", {"user": "alice", "active": "true"}).json()
        assert [g["id"] for g in listed["results"]] == [self.grant.pk]
        revoked = self.post_json(f"/api/grants/{self.grant.pk}/revoke/", {})
        assert revoked.status_code == 200 and revoked.json()["active"] is False
        assert self.api.get("/api/grants/", {"active": "true"}).json()["count"] == 0
