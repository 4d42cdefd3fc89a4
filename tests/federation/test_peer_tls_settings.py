"""Per-peer TLS settings: validated when entered, the key encrypted and never shown back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from console.services import config_export
from federation.admin import PeerAdminForm
from federation.models import Peer, Transport
from federation.services import PeerConfigError, peer_add, peer_set_tls
from tests.api.common import ApiTestCase
from tests.federation.pki import Authority, Pki, encrypted_key_pem

URL = "https://127.0.0.1:9/mcp"
KEY_MARKER = "PRIVATE KEY"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


def add(pki: Pki, **overrides: str) -> Peer:
    fields = {
        "name": "secure", "transport": Transport.STREAMABLE_HTTP, "url": URL, "tls_ca_bundle": pki.ca.pem,
        "tls_client_cert": pki.client.cert, "tls_client_key": pki.client.key, **overrides,
    }
    return peer_add(**fields)  # type: ignore[arg-type]


def refusal(pki: Pki, **overrides: str) -> str:
    with pytest.raises(PeerConfigError) as caught:
        add(pki, **overrides)
    assert not Peer.objects.filter(name="secure").exists()
    return str(caught.value)


@pytest.mark.django_db
def test_the_settings_are_stored_and_the_key_only_encrypted(pki: Pki) -> None:
    peer = add(pki)

    stored = Peer.objects.get(pk=peer.pk)
    assert (stored.tls_ca_bundle, stored.tls_client_cert, stored.tls_client_key) == (pki.ca.pem, pki.client.cert, pki.client.key)
    with connection.cursor() as cursor:
        cursor.execute("SELECT tls_client_key FROM federation_peer WHERE id = %s", [peer.pk])
        (raw,) = cursor.fetchone()
    assert raw and KEY_MARKER not in raw


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("tls_ca_bundle", "not a certificate", "not PEM"),
        ("tls_client_cert", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not PEM"),
        ("tls_client_key", "junk", "not a PEM private key"),
    ],
)
def test_junk_is_refused_with_what_was_expected(pki: Pki, field: str, value: str, expected: str) -> None:
    message = refusal(pki, **{field: value})

    assert field in message and expected in message


@pytest.mark.django_db
def test_a_private_key_pasted_into_the_shown_ca_field_is_refused(pki: Pki) -> None:
    assert "private key" in refusal(pki, tls_ca_bundle=pki.ca.pem + pki.client.key)


@pytest.mark.django_db
def test_a_passphrase_protected_key_is_refused_with_the_fix(pki: Pki) -> None:
    assert "passphrase" in refusal(pki, tls_client_key=encrypted_key_pem())


@pytest.mark.django_db
def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    assert "does not belong" in refusal(pki, tls_client_key=pki.server.key)


@pytest.mark.django_db
def test_a_certificate_without_its_key_is_refused_and_a_key_without_certificate_too(pki: Pki) -> None:
    assert "private key" in refusal(pki, tls_client_key="")
    assert "needs its client certificate" in refusal(pki, tls_client_cert="")


@pytest.mark.django_db
def test_expired_and_not_yet_valid_certificates_are_refused_when_entered(pki: Pki) -> None:
    now = datetime.now(UTC)
    expired = pki.ca.issue("old gateway", client=True, valid_from=now - timedelta(days=30), valid_until=now - timedelta(days=1))
    future = pki.ca.issue("early gateway", client=True, valid_from=now + timedelta(days=1), valid_until=now + timedelta(days=30))

    assert "expired on" in refusal(pki, tls_client_cert=expired.cert, tls_client_key=expired.key)
    assert "not valid before" in refusal(pki, tls_client_cert=future.cert, tls_client_key=future.key)
    assert "expired on" in refusal(pki, tls_ca_bundle=Authority(days=-1).pem)


@pytest.mark.django_db
def test_tls_settings_need_an_https_or_wss_url(pki: Pki) -> None:
    message = refusal(pki, url="http://127.0.0.1:9/mcp")

    assert "https:// or wss://" in message and "__all__" not in message


@pytest.mark.django_db
def test_set_tls_replaces_keeps_and_removes(pki: Pki) -> None:
    peer = add(pki)
    other = Authority("another CA")

    peer_set_tls(peer=peer, ca_bundle=other.pem)
    assert (peer.tls_ca_bundle, peer.tls_client_cert) == (other.pem, pki.client.cert)
    peer_set_tls(peer=peer, client_cert="", client_key="")
    peer.refresh_from_db()
    assert (peer.tls_ca_bundle, peer.tls_client_cert, peer.tls_client_key) == (other.pem, "", "")
    with pytest.raises(PeerConfigError, match="together"):
        peer_set_tls(peer=peer, client_cert=pki.client.cert)


# --- manage.py peer ------------------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("peer", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def pem_files(pki: Pki, tmp_path: Path) -> dict[str, Path]:
    return pki.write(tmp_path)


@pytest.mark.django_db
def test_peer_add_reads_the_pem_files_and_list_shows_no_key(pki: Pki, pem_files: dict[str, Path]) -> None:
    run(
        "add", "secure", "--url", URL, "--ca-file", str(pem_files["ca"]), "--client-cert-file", str(pem_files["client_cert"]),
        "--client-key-file", str(pem_files["client_key"]), "--no-sync",
    )
    out, _ = run("list")

    peer = Peer.objects.get(name="secure")
    assert (peer.tls_ca_bundle, peer.tls_client_key) == (pki.ca.pem, pki.client.key)
    assert "tls=ca-bundle,client-cert" in out and KEY_MARKER not in out


@pytest.mark.django_db
def test_peer_add_refuses_a_key_file_alone_and_unreadable_files(pem_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="go together"):
        run("add", "secure", "--url", URL, "--client-key-file", str(pem_files["client_key"]), "--no-sync")
    with pytest.raises(CommandError, match="cannot read --ca-file"):
        run("add", "secure", "--url", URL, "--ca-file", str(tmp_path / "missing.pem"), "--no-sync")
    (tmp_path / "binary.der").write_bytes(b"\x30\x82\xff\xfe")
    with pytest.raises(CommandError, match="not PEM"):
        run("add", "secure", "--url", URL, "--ca-file", str(tmp_path / "binary.der"), "--no-sync")
    assert not Peer.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_peer_tls_saves_then_reports_an_unreachable_peer_as_a_failure(pki: Pki, pem_files: dict[str, Path]) -> None:
    add(pki)

    with pytest.raises(CommandError, match="saved, but secure cannot be reached"):
        run("tls", "secure", "--no-client-cert")
    peer = Peer.objects.get(name="secure")
    assert (peer.tls_ca_bundle, peer.tls_client_cert, peer.tls_client_key) == (pki.ca.pem, "", "")
    with pytest.raises(CommandError, match="nothing to change"):
        run("tls", "secure")


# --- admin form ----------------------------------------------------------------------------------


def form_data(peer: Peer, **overrides: str) -> dict[str, str]:
    data = {
        "name": peer.name, "transport": peer.transport, "url": peer.url, "args": "[]", "enabled": "on", "max_processes": "8",
        "connect_timeout": "10", "call_timeout": "60", "tls_ca_bundle": peer.tls_ca_bundle, "tls_client_cert": peer.tls_client_cert,
    }
    return {**data, **overrides}


@pytest.mark.django_db
def test_the_admin_form_never_renders_the_key_and_keeps_it_when_left_blank(pki: Pki) -> None:
    peer = add(pki)

    form = PeerAdminForm(data=form_data(peer), instance=peer)
    assert form.is_valid(), form.errors
    form.save()
    assert "tls_client_key" not in form.fields and KEY_MARKER not in str(form)
    assert Peer.objects.get(pk=peer.pk).tls_client_key == pki.client.key


@pytest.mark.django_db
def test_the_admin_form_refuses_a_key_that_does_not_fit_and_a_certificate_without_key(pki: Pki) -> None:
    peer = add(pki)

    wrong_key = PeerAdminForm(data=form_data(peer, new_tls_client_key=pki.server.key), instance=peer)
    assert not wrong_key.is_valid()
    assert "does not belong" in str(wrong_key.errors["tls_client_cert"])
    fresh = Peer(name="fresh", transport=Transport.STREAMABLE_HTTP, url=URL)
    no_key = PeerAdminForm(data=form_data(fresh, tls_client_cert=pki.client.cert))
    assert not no_key.is_valid()
    assert "needs its private key" in str(no_key.errors["new_tls_client_key"])


@pytest.mark.django_db
def test_the_admin_form_removes_certificate_and_key_together(pki: Pki) -> None:
    peer = add(pki)

    form = PeerAdminForm(data=form_data(peer, clear_tls_client_key="on"), instance=peer)
    assert form.is_valid(), form.errors
    form.save()
    peer.refresh_from_db()
    assert (peer.tls_client_cert, peer.tls_client_key) == ("", "")


@pytest.mark.django_db
def test_a_certificate_that_expired_since_does_not_block_other_edits_in_the_admin(pki: Pki) -> None:
    peer = add(pki)
    now = datetime.now(UTC)
    old = pki.ca.issue("old gateway", client=True, valid_from=now - timedelta(days=30), valid_until=now - timedelta(days=1))
    Peer.objects.filter(pk=peer.pk).update(tls_client_cert=old.cert)
    peer.refresh_from_db()
    peer.tls_client_key = old.key
    peer.save(update_fields=["tls_client_key"])

    form = PeerAdminForm(data=form_data(peer, call_timeout="30"), instance=peer)
    assert form.is_valid(), form.errors


# --- REST API and configuration export -----------------------------------------------------------


class PeerTlsApiTest(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.pki = Pki.create()

    def test_create_takes_the_key_write_only_and_says_only_that_one_is_stored(self) -> None:
        reply = self.post_json("/api/peers/", {
            "name": "secure", "url": URL, "tls_ca_bundle": self.pki.ca.pem, "tls_client_cert": self.pki.client.cert,
            "tls_client_key": self.pki.client.key, "sync": False,
        })

        assert reply.status_code == 201, reply.content
        peer = reply.json()["peer"]
        assert (peer["tls_ca_bundle"], peer["tls_client_cert"], peer["has_tls_client_key"]) == (self.pki.ca.pem, self.pki.client.cert, True)
        assert KEY_MARKER not in reply.content.decode()
        assert KEY_MARKER not in self.api.get(f"/api/peers/{peer['id']}/").content.decode()

    def test_create_refuses_a_mismatched_key_with_400(self) -> None:
        reply = self.post_json("/api/peers/", {
            "name": "secure", "url": URL, "tls_client_cert": self.pki.client.cert, "tls_client_key": self.pki.server.key,
            "sync": False,
        })

        assert reply.status_code == 400
        assert "does not belong" in reply.content.decode()

    def test_update_refuses_junk_and_expired_certificates_with_400(self) -> None:
        peer = add(self.pki)
        path = f"/api/peers/{peer.pk}/"

        junk = self.api.patch(path, {"tls_ca_bundle": "junk"}, content_type="application/json")
        expired = self.api.patch(path, {"tls_ca_bundle": Authority(days=-1).pem}, content_type="application/json")
        lone = self.api.patch(path, {"tls_client_cert": self.pki.server.cert}, content_type="application/json")

        assert [junk.status_code, expired.status_code, lone.status_code] == [400, 400, 400]
        assert "expired on" in expired.content.decode()
        assert "does not belong" in lone.content.decode()

    def test_the_export_holds_the_certificates_but_never_the_key(self) -> None:
        add(self.pki)

        document = config_export()

        row = next(p for p in document["peers"] if p["name"] == "secure")
        assert (row["tls_ca_bundle"], row["tls_client_cert"]) == (self.pki.ca.pem, self.pki.client.cert)
        assert "peer.tls_client_key" in document["secrets_omitted"]
        assert KEY_MARKER not in str(document)
