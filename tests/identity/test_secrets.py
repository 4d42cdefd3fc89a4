"""Secrets at rest: peer client secrets and stdio environments are encrypted, rotatable, never shown."""

from __future__ import annotations

import importlib
import io
import json
import stat
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from cryptography.fernet import Fernet
from django.apps import apps
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client, RequestFactory, TestCase, override_settings

from federation.models import Peer
from federation.services import peer_add
from identity import crypto
from identity.crypto import SecretDecryptionError, fernet
from tests.identity.oauth import FAST_HASHERS

KEY_1 = Fernet.generate_key().decode()
KEY_2 = Fernet.generate_key().decode()
SECRET = "client-secret-that-must-never-be-seen"
API_KEY = "sk-live-api-key-that-must-never-be-seen"


def raw_column(peer: Peer, column: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM federation_peer WHERE id = %s", [peer.pk])  # noqa: S608 - a fixed column name
        return str(cursor.fetchone()[0])


def gateway_peer(name: str = "acme") -> Peer:
    return peer_add(
        name=name, transport="streamable-http", url="https://mcp.acme.example/mcp", is_gateway=True,
        client_id="fedmcp-at-acme", client_secret=SECRET, token_url="https://mcp.acme.example/o/token/",
    )


def stdio_peer(name: str = "tool") -> Peer:
    return peer_add(name=name, transport="stdio", command="mcp-server-time", env={"API_KEY": API_KEY})


@override_settings(FEDMCP_SECRETS_KEYS=KEY_1)
class EncryptedFieldTests(TestCase):
    def test_the_client_secret_and_the_environment_are_stored_encrypted(self) -> None:
        gateway, tool = gateway_peer(), stdio_peer()

        stored_secret, stored_env = raw_column(gateway, "client_secret"), raw_column(tool, "env")

        assert SECRET not in stored_secret and API_KEY not in stored_env and "API_KEY" not in stored_env
        assert fernet().decrypt(stored_secret.encode()).decode() == SECRET
        assert json.loads(fernet().decrypt(json.loads(stored_env).encode())) == {"API_KEY": API_KEY}

    def test_reading_a_peer_gives_the_plaintext_back(self) -> None:
        gateway_peer(), stdio_peer()

        assert Peer.objects.get(name="acme").client_secret == SECRET
        assert Peer.objects.get(name="tool").env == {"API_KEY": API_KEY}

    def test_no_secret_stays_empty(self) -> None:
        peer = peer_add(name="plain", transport="streamable-http", url="https://mcp.example/mcp")

        assert raw_column(peer, "client_secret") == ""
        assert Peer.objects.get(name="plain").client_secret == ""

    def test_dumpdata_writes_ciphertext_and_loaddata_restores_the_secrets(self) -> None:
        gateway_peer(), stdio_peer()
        out = io.StringIO()

        call_command("dumpdata", "federation.peer", stdout=out)
        dump = out.getvalue()
        Peer.objects.all().delete()
        fixture = Path(self.enterContext(tempfile.TemporaryDirectory())) / "peers.json"
        fixture.write_text(dump)
        call_command("loaddata", str(fixture), verbosity=0)

        assert SECRET not in dump and API_KEY not in dump
        assert Peer.objects.get(name="acme").client_secret == SECRET
        assert Peer.objects.get(name="tool").env == {"API_KEY": API_KEY}

    def test_a_value_no_configured_key_opens_fails_loudly(self) -> None:
        gateway_peer()

        with override_settings(FEDMCP_SECRETS_KEYS=KEY_2), pytest.raises(SecretDecryptionError):
            Peer.objects.get(name="acme")

    def test_a_malformed_key_is_a_configuration_error(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS="not-a-fernet-key"), pytest.raises(ImproperlyConfigured):
            fernet()

    def test_the_migration_encrypts_environments_stored_before_encryption(self) -> None:
        peer = stdio_peer()
        with connection.cursor() as cursor:
            cursor.execute("UPDATE federation_peer SET env = %s WHERE id = %s", [json.dumps({"API_KEY": API_KEY}), peer.pk])
        assert Peer.objects.get(pk=peer.pk).env == {"API_KEY": API_KEY}  # read as it was

        importlib.import_module("federation.migrations.0007_peer_credentials").encrypt_env(apps, None)

        assert API_KEY not in raw_column(peer, "env")
        assert Peer.objects.get(pk=peer.pk).env == {"API_KEY": API_KEY}


class RotationTests(TestCase):
    def test_rotate_secrets_reencrypts_with_the_first_key_so_the_old_one_can_go(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_1):
            gateway, tool = gateway_peer(), stdio_peer()
        before = raw_column(gateway, "client_secret"), raw_column(tool, "env")

        with override_settings(FEDMCP_SECRETS_KEYS=f"{KEY_2},{KEY_1}"):
            out = io.StringIO()
            call_command("rotate_secrets", stdout=out)

        after = raw_column(gateway, "client_secret"), raw_column(tool, "env")
        assert after[0] != before[0] and after[1] != before[1]
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_2):
            assert Peer.objects.get(name="acme").client_secret == SECRET
            assert Peer.objects.get(name="tool").env == {"API_KEY": API_KEY}
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_1), pytest.raises(SecretDecryptionError):
            Peer.objects.get(name="acme")
        assert "Re-encrypted 2 row(s)" in out.getvalue()

    def test_rows_beyond_one_batch_are_all_rewritten(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_1):
            peers = [gateway_peer(f"acme{i}") for i in range(3)]

        with override_settings(FEDMCP_SECRETS_KEYS=f"{KEY_2},{KEY_1}"), mock.patch.object(crypto, "ROTATE_BATCH", 2):
            out = io.StringIO()
            call_command("rotate_secrets", stdout=out)

        assert "Re-encrypted 3 row(s)" in out.getvalue()
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_2):
            assert [Peer.objects.get(pk=peer.pk).client_secret for peer in peers] == [SECRET] * 3

    def test_old_keys_still_decrypt_before_rotation(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_1):
            gateway_peer()

        with override_settings(FEDMCP_SECRETS_KEYS=f"{KEY_2},{KEY_1}"):
            assert Peer.objects.get(name="acme").client_secret == SECRET

    def test_rotation_without_the_old_key_changes_nothing(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS=KEY_1):
            peer = gateway_peer()
        before = raw_column(peer, "client_secret")

        with override_settings(FEDMCP_SECRETS_KEYS=KEY_2), pytest.raises(CommandError):
            call_command("rotate_secrets", stdout=io.StringIO())

        assert raw_column(peer, "client_secret") == before


def test_without_configuration_a_key_is_generated_once_into_var_with_mode_0600(tmp_path: Path) -> None:
    with override_settings(FEDMCP_SECRETS_KEYS="", BASE_DIR=tmp_path):
        first = fernet()
        token = first.encrypt(b"x")
        second = fernet()

    key_file = tmp_path / "var" / "secrets_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert second.decrypt(token) == b"x"


@override_settings(FEDMCP_SECRETS_KEYS=KEY_1, PASSWORD_HASHERS=FAST_HASHERS)
class NeverShownTests(TestCase):
    def test_peer_list_shows_the_client_id_but_never_the_secret_or_environment(self) -> None:
        gateway_peer(), stdio_peer()
        out = io.StringIO()

        call_command("peer", "list", stdout=out)

        assert "client=fedmcp-at-acme" in out.getvalue()
        assert SECRET not in out.getvalue() and API_KEY not in out.getvalue()

    def test_peer_add_reads_the_secret_from_a_file_and_stores_it_encrypted(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".secret") as handle:
            handle.write(SECRET + "\n")
            handle.flush()
            call_command(
                "peer", "add", "acme", "--url", "https://mcp.acme.example/mcp", "--gateway", "--client-id", "me",
                "--client-secret-file", handle.name, "--token-url", "https://mcp.acme.example/o/token/", "--no-sync",
                stdout=io.StringIO(),
            )

        peer = Peer.objects.get(name="acme")
        assert (peer.client_id, peer.client_secret, peer.token_url) == ("me", SECRET, "https://mcp.acme.example/o/token/")
        assert SECRET not in raw_column(peer, "client_secret")

    def test_the_admin_never_renders_the_secret_or_environment_values(self) -> None:
        gateway, tool = gateway_peer(), stdio_peer()
        staff = get_user_model().objects.create_superuser("root", "", "pw")
        client = Client()
        client.force_login(staff)

        pages = [client.get(f"/admin/federation/peer/{peer.pk}/change/") for peer in (gateway, tool)]

        assert [page.status_code for page in pages] == [200, 200]
        for page in pages:
            html = page.content.decode()
            assert SECRET not in html and API_KEY not in html
        assert "API_KEY" in pages[1].content.decode()  # the names are shown, not the values

    def test_the_admin_form_keeps_stored_secrets_when_left_blank_and_replaces_them_when_given(self) -> None:
        peer = gateway_peer()
        staff = get_user_model().objects.create_superuser("root", "", "pw")
        request = RequestFactory().get("/")
        request.user = staff
        model_admin = admin.site._registry[Peer]
        form_class = model_admin.get_form(request, peer)
        base = {name: value for name, value in form_class(instance=peer).initial.items() if value is not None}
        base["args"] = json.dumps(base.get("args", []))

        kept = form_class(data=base, instance=peer)
        assert kept.is_valid(), kept.errors
        kept.save()
        assert Peer.objects.get(pk=peer.pk).client_secret == SECRET

        replaced = form_class(data={**base, "new_client_secret": "rotated", "new_env": "TOKEN=abc"}, instance=peer)
        assert replaced.is_valid(), replaced.errors
        replaced.save()
        stored = Peer.objects.get(pk=peer.pk)
        assert (stored.client_secret, stored.env) == ("rotated", {"TOKEN": "abc"})
