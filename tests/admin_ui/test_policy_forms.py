"""Policy and rate-limit forms choose peers, users, clients and tools from what exists: a typo
("tmie", "nosuchuser") is refused with a message, not saved to match nothing."""

from __future__ import annotations

from django.test import TestCase

from federation.models import CatalogEntry, Peer, RateLimit
from identity.models import ConsentPolicy
from tests.admin_ui.common import staff_client
from tests.base import persona

POLICY_ADD = "/admin/identity/consentpolicy/add/"
LIMIT_ADD = "/admin/federation/ratelimit/add/"
POLICY = {"decision": "allow", "priority": "0", "redact_fields": "[]", "enabled": "on", "name_pattern": "*"}


class PolicyFormTest(TestCase):
    def setUp(self) -> None:
        self.peer = Peer.objects.create(name="time", transport="stdio", command="mcp-server-time")
        CatalogEntry.objects.create(peer=self.peer, kind="tool", upstream_name="get_current_time", name="time__get_current_time", home="time")
        persona("alice")

    def test_a_policy_naming_what_exists_is_saved(self) -> None:
        reply = staff_client().post(POLICY_ADD, {**POLICY, "peer": "time", "kind": "tool", "name_pattern": "get_current_time", "username": "alice"})

        assert reply.status_code == 302, reply.context["adminform"].form.errors
        assert ConsentPolicy.objects.get().username == "alice"

    def test_a_misspelt_peer_is_refused(self) -> None:
        reply = staff_client().post(POLICY_ADD, {**POLICY, "peer": "tmie"})

        assert reply.status_code == 200
        assert "peer" in reply.context["adminform"].form.errors
        assert not ConsentPolicy.objects.exists()

    def test_an_unknown_user_is_refused_with_the_known_ones(self) -> None:
        reply = staff_client().post(POLICY_ADD, {**POLICY, "username": "nosuchuser"})

        errors = reply.context["adminform"].form.errors
        assert "There is no user 'nosuchuser'" in " ".join(errors["username"]) and "alice" in " ".join(errors["username"])
        assert not ConsentPolicy.objects.exists()

    def test_an_unknown_tool_is_refused_but_a_pattern_is_kept(self) -> None:
        client = staff_client()
        refused = client.post(POLICY_ADD, {**POLICY, "peer": "time", "kind": "tool", "name_pattern": "get_curent_time"})
        assert "No tool of peer 'time' is called 'get_curent_time'" in " ".join(refused.context["adminform"].form.errors["name_pattern"])

        kept = client.post(POLICY_ADD, {**POLICY, "peer": "time", "kind": "tool", "name_pattern": "get_*"})
        assert kept.status_code == 302
        assert ConsentPolicy.objects.get().name_pattern == "get_*"

    def test_the_form_lists_peers_users_and_tools(self) -> None:
        page = staff_client().get(POLICY_ADD).content.decode()

        assert '<option value="time">' in page
        assert '<option value="alice">' in page and '<option value="get_current_time">' in page


class RateLimitFormTest(TestCase):
    def test_a_user_is_named_not_numbered(self) -> None:
        alice = persona("alice")
        reply = staff_client().post(LIMIT_ADD, {"scope": "identity", "username": "alice", "rate_per_minute": "60", "burst": "10"})

        assert reply.status_code == 302, reply.context["adminform"].form.errors
        assert RateLimit.objects.get().user == alice
        page = staff_client().get(f"/admin/federation/ratelimit/{RateLimit.objects.get().pk}/change/").content.decode()
        assert 'value="alice"' in page

    def test_an_unknown_user_or_client_is_refused(self) -> None:
        client = staff_client()
        user = client.post(LIMIT_ADD, {"scope": "identity", "username": "nosuchuser", "rate_per_minute": "60", "burst": "10"})
        app = client.post(LIMIT_ADD, {"scope": "identity", "client_id": "nosuchclient", "rate_per_minute": "60", "burst": "10"})

        assert "There is no user 'nosuchuser'" in " ".join(user.context["adminform"].form.errors["username"])
        assert "No OAuth client has the id 'nosuchclient'" in " ".join(app.context["adminform"].form.errors["client_id"])
        assert not RateLimit.objects.exists()

    def test_a_peer_rule_naming_a_user_is_still_refused(self) -> None:
        persona("alice")
        peer = Peer.objects.create(name="files", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        reply = staff_client().post(LIMIT_ADD, {"scope": "peer", "peer": peer.pk, "username": "alice", "rate_per_minute": "60", "burst": "10"})

        assert reply.status_code == 200
        assert not RateLimit.objects.exists()
