"""`manage.py token`: operator tokens for scripts and tests.

It validates scopes and lifetimes, creates the user only when asked, stores only the token's
checksum (DOT's RFC 9700 token storage), and prints a token the MCP transports accept.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from io import StringIO

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import TestCase, override_settings
from django.utils import timezone
from oauth2_provider.models import AccessToken

from identity.hostauth import scopes
from tests.base import ALICE, AsgiTestCase, McpClient, audience

PUBLIC_URL = "https://gateway.example"


def run_token(*args: str) -> str:
    """Run `manage.py token` with `args`; return what it printed."""
    out = StringIO()
    call_command("token", *args, stdout=out)
    return out.getvalue()


def row(raw: str) -> AccessToken:
    return AccessToken.objects.get(token_checksum=hashlib.sha256(raw.encode()).hexdigest())


@override_settings(FEDMCP_PUBLIC_URL=PUBLIC_URL)
class TokenCommandTests(TestCase):
    def test_it_prints_only_the_token(self) -> None:
        printed = run_token("--user", "carol", "--create-user")

        self.assertEqual(len(printed.splitlines()), 1)
        self.assertTrue(row(printed.strip()))

    def test_the_row_stores_a_checksum_and_no_plaintext_token(self) -> None:
        raw = run_token("--user", "carol", "--create-user").strip()

        token = row(raw)
        self.assertEqual(token.token, "")
        self.assertFalse(AccessToken.objects.filter(token=raw).exists())
        self.assertNotIn(raw, repr(list(AccessToken.objects.values())))

    def test_it_defaults_to_the_mcp_scopes_and_the_public_url(self) -> None:
        raw = run_token("--user", "carol", "--create-user").strip()

        token = row(raw)
        self.assertEqual(set(token.scope.split()), set(scopes.MCP_SCOPES))
        self.assertEqual(token.resource, [PUBLIC_URL])
        self.assertEqual(token.user.get_username(), "carol")

    def test_it_takes_scopes_and_a_resource(self) -> None:
        get_user_model().objects.create_user("carol", is_staff=True)
        raw = run_token(
            "--user", "carol", "--scope", f"{scopes.PROMPTS} {scopes.ADMIN}", "--resource", "http://127.0.0.1:9000"
        ).strip()

        token = row(raw)
        self.assertEqual(set(token.scope.split()), {scopes.PROMPTS, scopes.ADMIN})
        self.assertEqual(token.resource, ["http://127.0.0.1:9000"])

    def test_the_admin_scope_is_refused_for_a_user_who_is_not_staff(self) -> None:
        with self.assertRaises(CommandError):
            run_token("--user", "carol", "--create-user", "--scope", f"{scopes.TOOLS} {scopes.ADMIN}")

        self.assertFalse(AccessToken.objects.exists())

    def test_an_unknown_scope_is_refused_and_nothing_is_stored(self) -> None:
        with self.assertRaises(CommandError):
            run_token("--user", "carol", "--create-user", "--scope", f"{scopes.TOOLS} mcp:everything")

        self.assertFalse(AccessToken.objects.exists())

    def test_expires_takes_seconds_minutes_hours_and_days(self) -> None:
        for text, lifetime in (("45", timedelta(seconds=45)), ("45s", timedelta(seconds=45)), ("30m", timedelta(minutes=30)),
                               ("12h", timedelta(hours=12)), ("7d", timedelta(days=7))):
            before = timezone.now()
            raw = run_token("--user", "carol", "--create-user", "--expires", text).strip()
            after = timezone.now()

            expires = row(raw).expires
            self.assertTrue(before + lifetime <= expires <= after + lifetime, (text, expires))

    def test_the_default_lifetime_is_one_hour(self) -> None:
        before = timezone.now()
        raw = run_token("--user", "carol", "--create-user").strip()
        after = timezone.now()

        self.assertTrue(before + timedelta(hours=1) <= row(raw).expires <= after + timedelta(hours=1))

    def test_a_malformed_lifetime_is_refused_and_nothing_is_stored(self) -> None:
        for text in ("1w", "-5m", "soon", "", "1.5h", "h"):
            with self.assertRaises(CommandError, msg=text):
                run_token("--user", "carol", "--create-user", "--expires", text)

        self.assertFalse(AccessToken.objects.exists())

    def test_an_unknown_user_is_refused_and_the_error_names_the_fix(self) -> None:
        with self.assertRaises(CommandError) as refused:
            run_token("--user", "nobody")

        self.assertIn("--create-user", str(refused.exception))
        self.assertFalse(get_user_model().objects.filter(username="nobody").exists())
        self.assertFalse(AccessToken.objects.exists())

    def test_create_user_reuses_an_existing_user(self) -> None:
        existing = get_user_model().objects.create(username="carol")

        raw = run_token("--user", "carol", "--create-user").strip()

        self.assertEqual(row(raw).user_id, existing.pk)
        self.assertEqual(get_user_model().objects.filter(username="carol").count(), 1)


class TokenCommandAcceptedTests(AsgiTestCase):
    async def test_the_printed_token_opens_an_mcp_session_as_its_user(self) -> None:
        printed = await database_sync_to_async(run_token)("--user", ALICE, "--resource", audience())
        client = McpClient(token=printed.strip())

        await client.initialize()
        reply = await client.call("tools/list")

        self.assertEqual(reply.status, 200, reply.body)
        self.assertIn("tools", reply.json()["result"])

    async def test_a_token_minted_for_another_gateway_is_refused(self) -> None:
        printed = await database_sync_to_async(run_token)("--user", ALICE, "--resource", PUBLIC_URL)

        reply = await McpClient(token=printed.strip()).call_modern("tools/list")

        self.assertEqual(reply.status, 401)
