"""What the end user's consent pages say and do (issue 18, item 5), page by page.

/consent and /consent/<id>: what the tool does, how long the call waits, what "remember" covers,
why a second question about one call comes, times a person reads; an expired prompt is never
"pending". /consent/grants names applications. /consent/applications lists and revokes the
applications a user authorised and the accounts they connected. The admin says "Expired".
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client, TestCase, TransactionTestCase, override_settings
from django.utils import timezone
from oauth2_provider.models import AccessToken, Application, Grant, RefreshToken

from federation import naming
from federation.models import CatalogEntry, Peer, Transport
from identity.models import ConsentGrant, ConsentPrompt, UpstreamToken
from tests.base import AsgiTestCase, McpClient, mint_token

LONG_URL = "https://docs.example.org/search?q=" + "gateway" * 300
DESCRIPTION = "Fetch a web page and return its text."
GATEWAY = "home"


def make_user(name: str) -> Any:
    return get_user_model().objects.create_user(name, password="pw")


def make_application(name: str, **fields: Any) -> Application:
    return Application.objects.create(
        name=name, client_type=Application.CLIENT_PUBLIC, authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris="http://127.0.0.1:9/callback", **fields,
    )


def make_peer(name: str, **fields: Any) -> Peer:
    return Peer.objects.create(name=name, transport=Transport.STREAMABLE_HTTP, url=f"http://127.0.0.1:9/{name}", **fields)


def catalog_tool(peer: Peer, upstream_name: str, *, home: str = "", name: str = "", description: str = DESCRIPTION) -> CatalogEntry:
    """A tool as a sync stores it; one imported from a peer gateway has its owner's `home` and `name` there."""
    home = home or peer.name
    return CatalogEntry.objects.create(
        peer=peer, kind="tool", upstream_name=upstream_name, name=naming.qualify_name(home, name or upstream_name), home=home,
        payload={"name": upstream_name, "description": description, "inputSchema": {"type": "object"}},
    )


def make_prompt(user: Any, **fields: Any) -> ConsentPrompt:
    values: dict[str, Any] = {
        "id": f"p{ConsentPrompt.objects.count()}-" + "x" * 20, "user": user, "username": user.username, "peer": "web", "kind": "tool",
        "name": "fetch", "arguments": {"url": LONG_URL}, "expires_at": timezone.now() + timedelta(seconds=90),
        "client_id": "desk-id", "client_name": "Desk Host",
    }
    values.update(fields)
    return ConsentPrompt.objects.create(**values)


def section(html: str, prompt_id: str) -> str:
    match = re.search(rf'<section class="prompt" id="prompt-{re.escape(prompt_id)}".*?</section>', html, re.S)
    assert match, f"no prompt {prompt_id} on the page"
    return match.group(0)


@override_settings(FEDMCP_GATEWAY_NAME=GATEWAY, FEDMCP_CONSENT_TIMEOUT=120)
class ConsentPromptPageTests(TestCase):
    def setUp(self) -> None:
        self.alice = make_user("alice")
        self.browser = Client()
        self.browser.force_login(self.alice)
        self.web = make_peer("web")
        catalog_tool(self.web, "fetch")

    def test_a_prompt_says_what_the_tool_does_how_long_it_waits_and_what_remember_covers(self) -> None:
        prompt = make_prompt(self.alice, expires_at=timezone.now() + timedelta(minutes=10))

        html = self.browser.get("/consent").content.decode()

        shown = section(html, prompt.id)
        self.assertIn(DESCRIPTION, shown)
        waits = re.search(r'data-expires-in="(\d+)"', shown)
        assert waits is not None
        self.assertTrue(0 < int(waits.group(1)) <= 600, waits.group(1))
        self.assertRegex(shown, r"data-countdown>\d min \d\d s</span> more, then the call fails")
        self.assertIn("later calls of tool fetch on web from Desk Host go ahead without asking you, whatever their arguments", shown)
        self.assertIn("Approve once: only this call, with exactly these arguments.", shown)

    def test_times_are_marked_for_the_browser_and_readable_without_it(self) -> None:
        prompt = make_prompt(self.alice)

        shown = section(self.browser.get("/consent").content.decode(), prompt.id)

        time = re.search(r'<time datetime="([^"]+)">([^<]+)</time>', shown)
        assert time is not None
        self.assertEqual(time.group(1), prompt.created_at.isoformat())
        self.assertEqual(time.group(2), f"{prompt.created_at:%d %b %Y, %H:%M:%S} UTC")
        self.assertIn("toLocaleString", self.browser.get("/consent").content.decode())

    def test_a_long_argument_is_shown_whole_in_a_wrapping_block(self) -> None:
        prompt = make_prompt(self.alice)

        html = self.browser.get("/consent").content.decode()

        self.assertIn(LONG_URL, section(html, prompt.id))
        self.assertIn("grid-template-columns: max-content minmax(0, 1fr)", html)
        self.assertRegex(html, r"\.prompt pre \{[^}]*white-space: pre-wrap")

    def test_remembering_from_an_unknown_application_covers_any_application(self) -> None:
        prompt = make_prompt(self.alice, client_id="", client_name="")

        shown = section(self.browser.get("/consent").content.decode(), prompt.id)

        self.assertIn("from any application go ahead", shown)

    def test_an_expired_prompt_is_not_listed_and_its_page_says_expired(self) -> None:
        prompt = make_prompt(self.alice, expires_at=timezone.now() - timedelta(seconds=1))

        self.assertNotIn(prompt.id, self.browser.get("/consent").content.decode())
        page = self.browser.get(f"/consent/{prompt.id}").content.decode()

        self.assertIn("This request is expired; it can't be answered again.", page)
        self.assertNotIn('value="approve"', page)
        self.assertEqual(self.browser.post(f"/consent/{prompt.id}", {"action": "approve"}).status_code, 409)

    def test_every_consent_page_signs_out_with_a_post_and_links_the_applications_page(self) -> None:
        make_prompt(self.alice)
        for path in ("/consent", "/consent/grants", "/consent/applications", "/connect"):
            html = self.browser.get(path).content.decode()
            self.assertRegex(html, r'<form method="post" action="/accounts/logout/">.*?csrfmiddlewaretoken.*?id="sign-out"', path)
            self.assertIn('href="/consent/applications"', html, path)

        signed_out = self.browser.post("/accounts/logout/")

        self.assertEqual(signed_out.status_code, 302)
        self.assertTrue(self.browser.get("/consent")["Location"].startswith("/accounts/login/"))


@override_settings(FEDMCP_GATEWAY_NAME=GATEWAY, FEDMCP_CONSENT_TIMEOUT=120)
class AskedTwiceTests(TestCase):
    """alice of `home` calls gateway b's tool: home's own policy asks first, then b's question comes home."""

    def setUp(self) -> None:
        self.alice = make_user("alice")
        self.browser = Client()
        self.browser.force_login(self.alice)
        self.b = make_peer("b", is_gateway=True, remote_gateway="b")
        catalog_tool(self.b, "web__fetch", home="b.web", name="fetch", description="Fetch, as b's peer web does it.")

    def remote_prompt(self) -> ConsentPrompt:
        return make_prompt(self.alice, owner_gateway="b", via=["home", "b"], peer="web", name="fetch")

    def test_the_second_question_says_why_it_comes(self) -> None:
        make_prompt(self.alice, peer="b", name="web__fetch", status=ConsentPrompt.Status.APPROVED, decided_at=timezone.now())
        second = self.remote_prompt()

        shown = section(self.browser.get("/consent").content.decode(), second.id)

        self.assertIn("Asked again because gateway b&#x27;s policy asks too: you approved this call for home a moment ago", shown)
        self.assertIn("Fetch, as b&#x27;s peer web does it.", shown)
        self.assertIn("gateway b, which owns this tool, lets later calls of tool fetch on web from Desk Host", shown)

    def test_a_first_question_from_another_gateway_is_not_called_a_second_one(self) -> None:
        make_prompt(self.alice, peer="b", name="web__fetch", status=ConsentPrompt.Status.DENIED, decided_at=timezone.now())
        only = self.remote_prompt()

        self.assertNotIn("Asked again", section(self.browser.get("/consent").content.decode(), only.id))

    def test_the_first_question_warns_that_the_peer_gateway_may_ask_too(self) -> None:
        first = make_prompt(self.alice, peer="b", name="web__fetch")

        shown = section(self.browser.get("/consent").content.decode(), first.id)

        self.assertIn("b is another gateway: its own policy may ask you about this call once more", shown)


class GrantsPageTests(TestCase):
    def setUp(self) -> None:
        self.alice = make_user("alice")
        self.browser = Client()
        self.browser.force_login(self.alice)

    def grant(self, client_id: str) -> ConsentGrant:
        return ConsentGrant.objects.create(
            user=self.alice, peer="web", kind="tool", name="fetch", client_id=client_id, expires_at=timezone.now() + timedelta(hours=1)
        )

    def test_grants_name_the_application_not_its_client_id(self) -> None:
        app = make_application("Desk Host")
        named, anyone = self.grant(app.client_id), self.grant("")

        html = self.browser.get("/consent/grants").content.decode()

        self.assertRegex(html, rf'id="grant-{named.pk}">.*?<td data-label="Application" class="application">Desk Host</td>'.replace(".*?", "[\\s\\S]*?"))
        self.assertNotIn(app.client_id, html)
        self.assertRegex(html, rf'id="grant-{anyone.pk}">[\s\S]*?class="application">any application</td>')
        self.assertIn('<table class="stack" id="grants">', html)


class ApplicationsPageTests(TestCase):
    def setUp(self) -> None:
        self.alice, self.bob = make_user("alice"), make_user("bob")
        self.browser = Client()
        self.browser.force_login(self.alice)
        self.app = make_application("Desk Host")
        self.other = make_application("Other Host")
        later = timezone.now() + timedelta(hours=1)
        self.access = AccessToken.objects.create(user=self.alice, application=self.app, token="a1", expires=later, scope="mcp:tools mcp:resources")
        self.refresh = RefreshToken.objects.create(user=self.alice, application=self.app, token="r1", access_token=self.access)
        Grant.objects.create(
            user=self.alice, application=self.app, code="c1", expires=later, redirect_uri="http://127.0.0.1:9/callback",
            code_challenge="x" * 43, code_challenge_method="S256",
        )
        self.bobs = AccessToken.objects.create(user=self.bob, application=self.other, token="b1", expires=later, scope="mcp:tools")

    def test_it_lists_the_users_applications_by_name_with_what_they_may_do(self) -> None:
        html = self.browser.get("/consent/applications").content.decode()

        may = '<span title="mcp:resources">List, read and subscribe to resources</span>; <span title="mcp:tools">List and call tools</span>'
        self.assertRegex(html, rf'id="application-{self.app.pk}">[\s\S]*?<strong>Desk Host</strong>[\s\S]*?{re.escape(may)}')
        self.assertIn("renewed while you allow it", html)
        self.assertNotIn("Other Host", html)

    def test_revoking_deletes_the_applications_tokens_and_codes_only(self) -> None:
        response = self.browser.post(f"/consent/applications/{self.app.pk}/revoke")

        self.assertEqual((response.status_code, response["Location"]), (302, "/consent/applications"))
        self.assertFalse(AccessToken.objects.filter(user=self.alice).exists())
        self.assertFalse(RefreshToken.objects.filter(user=self.alice).exists())
        self.assertFalse(Grant.objects.filter(user=self.alice).exists())
        self.assertTrue(AccessToken.objects.filter(pk=self.bobs.pk).exists())
        self.assertIn("Revoked: Desk Host can no longer act as you", self.browser.get("/consent/applications").content.decode())

    def test_another_users_application_cannot_be_revoked_from_here(self) -> None:
        self.assertEqual(self.browser.post(f"/consent/applications/{self.other.pk}/revoke").status_code, 404)
        self.assertEqual(self.browser.post("/consent/applications/999999/revoke").status_code, 404)
        self.assertTrue(AccessToken.objects.filter(pk=self.bobs.pk).exists())

    def test_it_needs_a_signed_in_user_and_a_csrf_token(self) -> None:
        self.assertTrue(Client().get("/consent/applications")["Location"].startswith("/accounts/login/"))
        strict = Client(enforce_csrf_checks=True)
        strict.force_login(self.alice)
        self.assertEqual(strict.post(f"/consent/applications/{self.app.pk}/revoke").status_code, 403)
        page = strict.get("/consent/applications")
        self.assertEqual(page["X-Frame-Options"], "DENY")
        self.assertIn("no-store", page["Cache-Control"])


class ConnectedAccountsTests(TransactionTestCase):
    """Disconnecting runs the async upstream_oauth service, which needs real commits."""

    def setUp(self) -> None:
        self.alice = make_user("alice")
        self.browser = Client()
        self.browser.force_login(self.alice)

    def test_connected_accounts_are_listed_and_disconnected_from_here(self) -> None:
        peer = make_peer("notes", user_oauth=True)
        UpstreamToken.objects.create(user=self.alice, peer=peer, issuer="http://127.0.0.1:9", access_token="secret-at", scope="notes.read")

        html = self.browser.get("/consent/applications").content.decode()
        self.assertRegex(html, r'id="connection-notes">[\s\S]*?notes\.read[\s\S]*?name="from" value="applications"')
        self.assertNotIn("secret-at", html)

        response = self.browser.post("/connect/notes/disconnect", {"from": "applications"})

        self.assertEqual((response.status_code, response["Location"]), (302, "/consent/applications"))
        self.assertFalse(UpstreamToken.objects.filter(user=self.alice).exists())
        self.assertEqual(self.browser.post("/connect/notes/disconnect", {"from": "https://evil.example/"})["Location"], "/connect")


class AdminPromptStatusTests(TestCase):
    def setUp(self) -> None:
        self.admin = get_user_model().objects.create_superuser("root", password="pw")
        self.browser = Client()
        self.browser.force_login(self.admin)
        self.waiting = make_prompt(self.admin, name="waiting")
        self.lapsed = make_prompt(self.admin, name="lapsed", expires_at=timezone.now() - timedelta(seconds=1))

    def test_a_pending_prompt_past_its_expiry_is_shown_and_filtered_as_expired(self) -> None:
        listing = self.browser.get("/admin/identity/consentprompt/").content.decode()
        self.assertRegex(listing, r'>lapsed</td>[\s\S]*?<td class="field-current_status">Expired</td>')
        self.assertRegex(listing, r'>waiting</td>[\s\S]*?<td class="field-current_status">Pending</td>')

        pending = self.browser.get("/admin/identity/consentprompt/?status=pending").content.decode()
        expired = self.browser.get("/admin/identity/consentprompt/?status=expired").content.decode()

        self.assertIn(">waiting<", pending)
        self.assertNotIn(">lapsed<", pending)
        self.assertIn(">lapsed<", expired)
        self.assertNotIn(">waiting<", expired)
        self.assertIn("Expired", self.browser.get(f"/admin/identity/consentprompt/{self.lapsed.pk}/change/").content.decode())


class RevokedApplicationAtMcpTests(AsgiTestCase):
    """Revoking on the page signs the application out of /mcp at once (401), in this process's caches too."""

    async def test_a_revoked_applications_token_is_refused(self) -> None:
        app = await sync_to_async(make_application)("Desk Host")
        raw = await sync_to_async(mint_token)("alice", application=app)
        host = McpClient(token=raw)
        await host.initialize()

        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        response = await browser.post(f"/consent/applications/{app.pk}/revoke")
        self.assertEqual(response.status_code, 302)

        refused = await McpClient(token=raw).post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertEqual(refused.status, 401)
        again = await host.post({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        self.assertEqual(again.status, 401)


class LiveFeedDisplayTests(AsgiTestCase):
    """A prompt pushed to an open page carries what a rendered one shows: description, countdown, remember's scope."""

    async def test_a_pushed_prompt_says_what_the_tool_does_and_how_long_it_waits(self) -> None:
        from channels.testing import WebsocketCommunicator

        from fedmcp_site.asgi import application
        from identity.consent.policy import Decision
        from identity.consent.prompts import consent_prompt_create
        from identity.hostauth.tokens import Identity

        @sync_to_async
        def setup() -> Application:
            catalog_tool(make_peer("web"), "fetch")
            return make_application("Desk Host")

        app = await setup()
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1"), (b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())]
        feed = WebsocketCommunicator(application, "/consent/ws", headers=headers)
        connected, _ = await feed.connect(5)
        self.assertTrue(connected)
        try:
            caller = Identity(
                token_id=1, user_id=self.alice.pk, username="alice", application_id=app.pk, client_id=app.client_id,
                scopes=frozenset(), expires=timezone.now() + timedelta(hours=1),
            )
            await consent_prompt_create(
                identity=caller, peer="web", kind="tool", name="fetch", arguments={"url": LONG_URL},
                decision=Decision("ask"), timeout=300,
            )
            pushed = (await feed.receive_json_from(5))["prompt"]
        finally:
            await feed.disconnect()

        self.assertEqual(pushed["description"], DESCRIPTION)
        self.assertTrue(0 < pushed["expires_in"] <= 300, pushed["expires_in"])
        self.assertIn("later calls of tool fetch on web from Desk Host go ahead without asking you", pushed["remember_text"])
        self.assertEqual(pushed["asked_again"], "")
