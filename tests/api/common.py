"""Shared setup of the REST API tests: an operator with an `admin`-scoped token, a peer, events."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.test import Client, TransactionTestCase
from django.utils import timezone

from federation.models import CatalogKind, Peer, Transport
from identity.hostauth import scopes
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy
from tests.base import HOST, add_catalog_entry, mint_token, persona

OPERATOR = "root"


def api_client(token: str | None = None) -> Client:
    """A test client addressing the gateway as its tokens' audience (http://127.0.0.1), with `token`."""
    headers = {"host": HOST} | ({"authorization": f"Bearer {token}"} if token else {})
    return Client(headers=headers)


class ApiTestCase(TransactionTestCase):
    """`self.api` sends the operator's admin token; `self.peer` has one tool and one prompt."""

    def setUp(self) -> None:
        operator = persona(OPERATOR)
        operator.is_staff = True
        operator.save()
        self.admin_token = mint_token(OPERATOR, scope=scopes.ADMIN)
        self.api = api_client(self.admin_token)
        self.peer = Peer.objects.create(
            name="files", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp",
            client_id="gw-client", client_secret="peer-secret-value", env={"API_KEY": "env-secret-value"},
        )
        self.tool = add_catalog_entry(self.peer, CatalogKind.TOOL, "read")
        self.prompt = add_catalog_entry(self.peer, CatalogKind.PROMPT, "summarise")
        self.policy = ConsentPolicy.objects.create(
            description="ask before writing", peer="files", kind="tool", name_pattern="write*", decision="ask", priority=5,
            redact_fields=["password"],
        )
        self.grant = ConsentGrant.objects.create(
            user=persona("alice"), peer="files", kind="tool", name="write", expires_at=timezone.now() + timedelta(days=1)
        )
        AuditEvent.objects.create(username="alice", peer="files", method="tools/call", name="read", outcome="ok", latency_ms=12.5)
        AuditEvent.objects.create(username="bob", peer="files", method="tools/call", name="read", outcome="error", error_code=-32010, latency_ms=40.0)

    def post_json(self, path: str, body: Any, client: Client | None = None) -> Any:
        return (client or self.api).post(path, body, content_type="application/json")
