"""Configuration export and import: same peers, switches and limits on an empty gateway; no secrets."""

from __future__ import annotations

import io
import json
from pathlib import Path

from django.contrib.auth.models import Group
from django.core.management import call_command

from federation.models import CatalogEntry, Peer, RateLimit, RateLimitScope
from identity.models import AuditEvent, ConsentPolicy
from tests.api.common import ApiTestCase

SECRETS = ("peer-secret-value", "env-secret-value", "API_KEY")


def snapshot() -> dict[str, object]:
    peers = {
        p.name: (p.transport, p.url, p.enabled, p.client_id, p.call_timeout)
        for p in Peer.objects.all()
    }
    switches = sorted((e.peer.name, e.kind, e.upstream_name, e.name, e.enabled) for e in CatalogEntry.objects.select_related("peer"))
    limits = sorted((r.scope, r.peer.name if r.peer else "", r.rate_per_minute, r.burst) for r in RateLimit.objects.select_related("peer"))
    policies = sorted(
        (p.peer, p.kind, p.name_pattern, p.decision, p.priority, tuple(p.redact_fields), p.group.name if p.group else "")
        for p in ConsentPolicy.objects.select_related("group")
    )
    return {"peers": peers, "catalog": switches, "limits": limits, "policies": policies}


def empty_the_gateway() -> None:
    Peer.objects.all().delete()
    RateLimit.objects.all().delete()
    ConsentPolicy.objects.all().delete()


class ConfigTransferTest(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.prompt.enabled = False
        self.prompt.save()
        RateLimit.objects.create(scope=RateLimitScope.PEER, peer=self.peer, rate_per_minute=60, burst=5)
        ConsentPolicy.objects.create(peer="", name_pattern="*", decision="allow", group=Group.objects.create(name="staff"))

    def test_export_then_import_into_an_empty_gateway_gives_the_same_configuration(self) -> None:
        before = snapshot()
        exported = self.api.get("/api/config/export")
        assert exported.status_code == 200
        text = exported.content.decode()
        assert not [s for s in SECRETS if s in text]
        assert set(exported.json()["secrets_omitted"]) == {"peer.client_secret", "peer.tls_client_key", "peer.env"}

        empty_the_gateway()
        assert Peer.objects.count() == 0
        imported = self.post_json("/api/config/import", exported.json())

        assert imported.status_code == 200
        assert snapshot() == before
        peer = Peer.objects.get(name="files")
        assert peer.client_secret == "" and peer.env == {}

    def test_importing_twice_changes_nothing_more(self) -> None:
        document = self.api.get("/api/config/export").json()
        empty_the_gateway()
        self.post_json("/api/config/import", document)
        once = snapshot()
        again = self.post_json("/api/config/import", document)

        assert again.status_code == 200
        assert snapshot() == once
        assert Peer.objects.count() == 1 and RateLimit.objects.count() == 1 and ConsentPolicy.objects.count() == 2

    def test_import_keeps_the_secrets_already_stored(self) -> None:
        document = self.api.get("/api/config/export").json()
        self.post_json("/api/config/import", document)

        peer = Peer.objects.get(name="files")
        assert peer.client_secret == "peer-secret-value"
        assert peer.env == {"API_KEY": "env-secret-value"}

    def test_import_refuses_a_document_of_another_kind_with_400(self) -> None:
        assert self.post_json("/api/config/import", {"peers": []}).status_code == 400
        assert self.post_json("/api/config/import", {"format": "fedmcp-config/1", "peers": [{"name": "x", "transport": "nope"}]}).status_code == 400

    def test_import_refuses_rows_that_are_not_objects_with_400(self) -> None:
        for bad in ({"rate_limits": ["x"]}, {"policies": [1]}, {"peers": [{"name": "x", "transport": "stdio", "command": "c", "catalog": ["y"]}]}):
            assert self.post_json("/api/config/import", {"format": "fedmcp-config/1", **bad}).status_code == 400, bad

    def test_import_refuses_rows_their_models_would_not_accept_and_stores_nothing(self) -> None:
        # Found by schemathesis: a policy with decision "" was stored, and then every answer
        # listing it broke the API's own schema.
        before = snapshot()
        bad_rows = (
            {"policies": [{"name_pattern": "*", "decision": ""}]},
            {"rate_limits": [{"scope": "galaxy", "rate_per_minute": 1, "burst": 1}]},
            {"peers": [{"name": "x", "transport": "stdio", "command": "c", "catalog": [{"kind": "spell", "upstream_name": "y"}]}]},
        )
        for bad in bad_rows:
            reply = self.post_json("/api/config/import", {"format": "fedmcp-config/1", **bad})
            assert reply.status_code == 400, (bad, reply.content)
            assert "detail" in reply.json()
        assert snapshot() == before

    def test_the_management_command_round_trips_through_a_file(self) -> None:
        path = Path(self.tmp_dir()) / "config.json"
        before = snapshot()
        call_command("config", "export", str(path), stderr=io.StringIO())
        text = path.read_text()
        assert not [s for s in SECRETS if s in text]
        assert json.loads(text)["format"] == "fedmcp-config/1"

        empty_the_gateway()
        call_command("config", "import", str(path), stdout=io.StringIO())
        call_command("config", "import", str(path), stdout=io.StringIO())

        assert snapshot() == before
        assert AuditEvent.objects.count() == 2  # the audit log is not configuration

    def tmp_dir(self) -> str:
        import tempfile

        directory = tempfile.mkdtemp(prefix="fedmcp-config-")
        self.addCleanup(__import__("shutil").rmtree, directory, True)
        return directory
