"""Abuse probes, in process: what an attacker sends, and the precise refusal it gets.

Already covered elsewhere, not repeated here (see docs/SECURITY.md for the full map):
no or bad tokens on every transport, tokens in the query string, another user's session id
(tests/mcp_endpoint/test_auth_rejections.py); forged, replayed, expired and wrong-audience
identity assertions (tests/identity/test_assertions.py); the sign-in page's CSRF, framing and
off-site `next` (tests/identity/test_pages.py); redirect_uri matching on /o/authorize
(tests/identity/test_redirect_uris.py); private, link-local, metadata, ULA and loopback peer
URLs and the no-redirect client (tests/federation/test_client_guard.py); an SSE `endpoint`
event on another origin (tests/federation/test_upstream_transports.py); bodies over the cap,
413 (tests/mcp_endpoint/test_bad_inputs.py).

Added here: framing headers on every HTML page, CSRF on the admin and its forms and on the
API's session authentication, the admin sign-in's `next`, a peer host name that resolves to a
private address, an upstream that answers with a redirect, and header injection through the
2026-07-28 routing headers (`Mcp-Method`, `Mcp-Name`, incl. the `=?base64?…?=` form).
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from django.contrib import admin
from django.test import Client, TestCase, override_settings
from django.urls import reverse

from federation.client import OutboundAddressError, check_url_allowed
from federation.models import CatalogEntry, Transport
from federation.services import peer_add, peer_sync_catalog
from tests.base import MODERN, FixturePeerTestCase, McpClient, modern_meta, request

PASSWORD = "correct horse battery staple"


def staff_client(*, csrf: bool = False) -> tuple[Client, Any]:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_superuser("root", "root@example.invalid", PASSWORD)
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client, user


# --- clickjacking ---------------------------------------------------------------------------------


def html_pages() -> list[str]:
    """Every parameterless HTML page a signed-in operator can open, admin changelists included."""
    pages = ["/", "/admin/", "/admin/dashboard/", "/consent", "/consent/grants", "/consent/applications", "/api/docs/", "/api/redoc/", "/no-such-page"]
    for model in admin.site._registry:
        meta = model._meta
        pages += [reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"), reverse(f"admin:{meta.app_label}_{meta.model_name}_add")]
    return pages


class FramingTests(TestCase):
    def test_every_html_page_refuses_to_be_framed(self) -> None:
        client, _ = staff_client()
        anonymous = Client()
        wrong: dict[str, Any] = {}
        seen = 0
        for path in html_pages() + ["/admin/login/", "/accounts/login/"]:
            for who in (client, anonymous):
                response = who.get(path)
                if not response.get("Content-Type", "").startswith("text/html"):
                    continue
                seen += 1
                if response.get("X-Frame-Options") != "DENY":
                    wrong[f"{path} ({response.status_code})"] = response.get("X-Frame-Options")
        self.assertGreater(seen, 10)
        self.assertEqual(wrong, {})


# --- CSRF ----------------------------------------------------------------------------------------


class CsrfTests(TestCase):
    def test_the_admin_sign_in_needs_the_csrf_token(self) -> None:
        from django.contrib.auth import get_user_model

        get_user_model().objects.create_superuser("root", "root@example.invalid", PASSWORD)
        browser = Client(enforce_csrf_checks=True)
        response = browser.post("/admin/login/", {"username": "root", "password": PASSWORD})
        self.assertEqual(response.status_code, 403)

    def test_every_admin_add_form_needs_the_csrf_token(self) -> None:
        client, _ = staff_client(csrf=True)
        statuses = {}
        for model in admin.site._registry:
            meta = model._meta
            path = reverse(f"admin:{meta.app_label}_{meta.model_name}_add")
            statuses[path] = client.post(path, {"name": "x"}).status_code
        self.assertEqual(statuses, dict.fromkeys(statuses, 403))

    def test_revoking_a_grant_needs_the_csrf_token(self) -> None:
        client, _ = staff_client(csrf=True)
        self.assertEqual(client.post("/consent/grants/1/revoke").status_code, 403)

    def test_the_api_with_a_session_cookie_needs_the_csrf_token(self) -> None:
        client, _ = staff_client(csrf=True)
        response = client.post("/api/peers/", {"name": "x", "url": "http://127.0.0.1:1/mcp"}, content_type="application/json")
        self.assertEqual(response.status_code, 403)


# --- open redirects -------------------------------------------------------------------------------

OFFSITE_NEXT = ["https://evil.example/", "//evil.example/", "/\\evil.example/", "https:evil.example", "\\\\evil.example"]


class AdminSignInRedirectTests(TestCase):
    def test_an_offsite_next_is_never_followed(self) -> None:
        from django.contrib.auth import get_user_model

        get_user_model().objects.create_superuser("root", "root@example.invalid", PASSWORD)
        found = {}
        for target in OFFSITE_NEXT:
            browser = Client()
            response = browser.post(f"/admin/login/?next={target}", {"username": "root", "password": PASSWORD, "next": target})
            found[target] = response.status_code, response.get("Location", "")
        offsite = {t: v for t, v in found.items() if "evil.example" in v[1]}
        self.assertEqual(offsite, {})
        self.assertEqual({v[0] for v in found.values()}, {302})


# --- SSRF -----------------------------------------------------------------------------------------


def resolving_to(address: str) -> Any:
    async def getaddrinfo(host: str, port: Any, **kwargs: Any) -> list[Any]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    return getaddrinfo


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
class DnsRebindingTests(TestCase):
    """A public-looking host name that resolves to a private address is refused after resolution."""

    async def check(self, address: str) -> bool:
        import asyncio

        loop = asyncio.get_running_loop()
        with mock.patch.object(loop, "getaddrinfo", resolving_to(address)):
            try:
                await check_url_allowed("http://mcp.attacker.example/mcp")
            except OutboundAddressError:
                return False
            return True

    async def test_names_resolving_to_private_metadata_ula_or_loopback_are_refused(self) -> None:
        addresses = ["10.1.2.3", "169.254.169.254", "fd12:3456::1", "127.0.0.1", "::1", "100.64.0.1"]
        verdicts = {a: await self.check(a) for a in addresses}
        self.assertEqual(verdicts, dict.fromkeys(addresses, False))

    async def test_the_shared_address_space_is_refused_too(self) -> None:
        # Regression: 100.64.0.0/10 is not `is_private` in Python, and a cloud metadata service
        # lives there (100.100.100.200); federation/client.py now refuses every non-global address.
        refused = []
        for url in ("http://100.64.0.1/mcp", "http://100.100.100.200/latest/meta-data/", "http://[::ffff:100.100.100.200]/"):
            try:
                await check_url_allowed(url)
            except OutboundAddressError:
                refused.append(url)
        self.assertEqual(len(refused), 3)

    async def test_a_name_resolving_to_a_public_address_is_allowed(self) -> None:
        self.assertTrue(await self.check("93.184.216.34"))


class _Redirector(BaseHTTPRequestHandler):
    target = ""
    hits = 0

    def do_POST(self) -> None:  # noqa: N802
        type(self).hits += 1
        self.send_response(307)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="class")
def redirector(request: pytest.FixtureRequest, everything_url: str) -> Iterator[None]:
    handler = type("Redirector", (_Redirector,), {"target": everything_url, "hits": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    request.cls.redirect_url = f"http://127.0.0.1:{server.server_port}/mcp"
    request.cls.redirect_handler = handler
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.usefixtures("redirector")
class RedirectingUpstreamTests(FixturePeerTestCase):
    """An upstream that answers 307 to another server: the gateway does not follow it."""

    redirect_url: str
    redirect_handler: Any

    def test_a_redirect_is_not_followed_and_the_sync_fails(self) -> None:
        peer = peer_add(name="bouncer", transport=Transport.STREAMABLE_HTTP, url=self.redirect_url, connect_timeout=5.0, call_timeout=5.0)
        report = async_to_sync(peer_sync_catalog)(peer=peer)
        self.assertFalse(report.ok)
        self.assertGreaterEqual(self.redirect_handler.hits, 1)
        peer.refresh_from_db()
        self.assertFalse(CatalogEntry.objects.filter(peer=peer).exists())


# --- header injection through the 2026-07-28 routing headers -------------------------------------


def b64(value: str) -> str:
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


NAME = "everything__add"
BAD_HEADERS: dict[str, dict[str, str]] = {
    "CR LF in Mcp-Name": {"mcp-name": "everything__add\r\nX-Injected: 1"},
    "LF in Mcp-Name": {"mcp-name": "everything__add\nX-Injected: 1"},
    "NUL in Mcp-Name": {"mcp-name": "everything__add\x00"},
    "Latin-1 byte in Mcp-Name": {"mcp-name": "everything__add\xe9"},
    "raw UTF-8 in Mcp-Name": {"mcp-name": "évil".encode().decode("latin-1")},
    "base64 of another name": {"mcp-name": b64("everything__whoami")},
    "base64 that is not base64": {"mcp-name": "=?base64?***?="},
    "base64 of invalid UTF-8": {"mcp-name": "=?base64?" + base64.b64encode(b"\xff\xfe").decode() + "?="},
    "base64 of CR LF": {"mcp-name": b64("everything__add\r\nX: 1")},
    "CR LF in Mcp-Method": {"mcp-method": "tools/call\r\nX: 1"},
    "unknown Mcp-Param header with CR LF": {"mcp-name": NAME, "mcp-param-a": "1\r\nX: 1"},
    "empty Mcp-Name": {"mcp-name": ""},
    "very long Mcp-Name": {"mcp-name": "a" * 64 * 1024},
}


class HeaderInjectionTests(FixturePeerTestCase):
    async def test_routing_headers_with_control_bytes_or_bad_encodings_get_a_clear_4xx(self) -> None:
        client = McpClient()
        body = request("tools/call", {"name": NAME, "arguments": {"a": 1, "b": 2}, "_meta": modern_meta()}, 1)
        found = {}
        for label, extra in BAD_HEADERS.items():
            headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": NAME, **extra}
            reply = await client.post(body, headers)
            found[label] = (reply.status, reply.error_code)
        server_errors = {k: v for k, v in found.items() if v[0] >= 500}
        self.assertEqual(server_errors, {})
        # Whatever disagrees with the body is refused; the one header the body does not name is ignored.
        refused = {k for k, v in found.items() if v[0] == 400}
        self.assertEqual(set(found) - refused, {"unknown Mcp-Param header with CR LF"}, found)

    async def test_the_base64_form_of_the_right_name_is_accepted(self) -> None:
        client = McpClient()
        body = request("tools/call", {"name": NAME, "arguments": {"a": 1, "b": 2}, "_meta": modern_meta()}, 1)
        reply = await client.post(body, {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": b64(NAME)})
        self.assertEqual(reply.status, 200, reply)
