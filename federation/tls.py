"""TLS to peers: the per-peer trust and client certificate, their validation, and their errors.

A peer served over HTTPS (or WSS) is verified, always. Its settings:

* `ca_bundle`: PEM certificates of the CAs that sign the peer's certificate. When set they are
  the *only* trust anchors for that peer (the default trust store is not consulted), as with
  `curl --cacert`: a peer with a private CA is pinned to it. When blank, the default trust store
  is used: certifi's bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (as httpx does).
* `client_cert` / `client_key`: a PEM certificate (chain) and its private key, presented when
  the peer asks for one (mutual TLS). The key is stored encrypted (identity/crypto.py) and is
  never shown back; the certificate is public and is shown and exported like the bundle.

The settings go wherever this gateway talks to the peer: MCP traffic on every transport, its
OAuth metadata discovery and its token endpoint (federation/credentials.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import certifi
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from django.core.exceptions import ValidationError

KEY_MARKER = "PRIVATE KEY-----"


class PeerTlsError(Exception):
    """A peer's TLS settings cannot be used; the message says what to fix and holds no secret."""


@dataclass(frozen=True)
class PeerTls:
    """The TLS settings of one peer (all PEM text; "" for none)."""

    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = field(default="", repr=False)

    def is_default(self) -> bool:
        return not (self.ca_bundle or self.client_cert or self.client_key)


# --- validation ----------------------------------------------------------------------------------


def _certificates(text: str, what: str) -> list[x509.Certificate]:
    if KEY_MARKER in text:
        # These fields are shown in the admin and exported; a key pasted here would leak.
        raise ValidationError(f"The {what} holds a private key: paste certificates only here.")
    try:
        return x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise ValidationError(
            f"The {what} is not PEM: expected one or more '-----BEGIN CERTIFICATE-----' blocks."
        ) from exc


def validate_ca_bundle(text: str) -> None:
    """Refuse a CA bundle that is not PEM certificates (a model field validator)."""
    if text.strip():
        _certificates(text, "CA bundle")


def validate_client_cert(text: str) -> None:
    """Refuse a client certificate that is not PEM certificates (a model field validator)."""
    if text.strip():
        _certificates(text, "client certificate")


def _private_key(text: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError as exc:
        raise ValidationError(
            "The private key is protected by a passphrase: store it decrypted "
            "(`openssl pkey -in key.pem -out plain.pem`); fedmcp encrypts it at rest."
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValidationError("The private key is not a PEM private key ('-----BEGIN PRIVATE KEY-----').") from exc


def validate_client_key(text: str) -> None:
    """Refuse a client key that is not an unencrypted PEM private key (a model field validator)."""
    if text.strip():
        _private_key(text)


def check_pair(client_cert: str, client_key: str) -> None:
    """Refuse a key without a certificate, and a key that does not belong to the certificate.

    Raises:
        ValidationError: keyed on `tls_client_cert`, the field forms show (the key is write-only).
    """
    if client_key.strip() and not client_cert.strip():
        raise ValidationError({"tls_client_cert": "A client private key needs its client certificate."})
    if not (client_cert.strip() and client_key.strip()):
        return
    try:
        leaf = _certificates(client_cert, "client certificate")[0]
        key = _private_key(client_key)
    except ValidationError:
        return  # the field validators already say what is wrong
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValidationError({"tls_client_cert": "The client private key does not belong to this certificate (its first one)."})


def check_current(text: str, what: str, *, now: datetime | None = None) -> None:
    """Refuse certificates that have expired or are not valid yet (checked when they are entered).

    Only at input: a stored certificate that expires later must not block unrelated edits of the
    peer (disabling it, say); the connection then fails with the verification error instead.

    Raises:
        ValidationError: naming the certificate and the date.
    """
    if not text.strip():
        return
    now = now or datetime.now(UTC)
    for cert in _certificates(text, what):
        subject = cert.subject.rfc4514_string() or "(no subject)"
        if cert.not_valid_after_utc < now:
            raise ValidationError(f"The {what} {subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}.")
        if cert.not_valid_before_utc > now:
            raise ValidationError(f"The {what} {subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}.")


def check_current_ca_bundle(text: str) -> None:
    """`check_current` for a CA bundle being entered (a form or serializer validator)."""
    check_current(text, "CA bundle")


def check_current_client_cert(text: str) -> None:
    """`check_current` for a client certificate being entered (a form or serializer validator)."""
    check_current(text, "client certificate")


def check_dates(*, ca_bundle: str, client_cert: str) -> None:
    """Refuse expired or not-yet-valid certificates an operator is entering (see `check_current`).

    Raises:
        ValidationError: keyed by field name.
    """
    errors: dict[str, list[str]] = {}
    for name, text, what in (("tls_ca_bundle", ca_bundle, "CA bundle"), ("tls_client_cert", client_cert, "client certificate")):
        try:
            check_current(text, what)
        except ValidationError as exc:
            errors[name] = exc.messages
    if errors:
        raise ValidationError(errors)


# --- the SSL context -----------------------------------------------------------------------------


@contextlib.contextmanager
def _pem_file(text: str, name: str) -> Iterator[str]:
    """Yield a path holding `text` for OpenSSL, which loads client certificates only from files.

    On Linux an anonymous memory file (never on disk); elsewhere a 0600 file in a private
    temporary folder, removed on exit.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"fedmcp-{name}", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="fedmcp-tls-") as folder:
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        yield path


def _default_context() -> ssl.SSLContext:
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


@functools.lru_cache(maxsize=64)
def ssl_context(tls: PeerTls) -> ssl.SSLContext:
    """Return the verifying client context for a peer's settings (shared: contexts are thread-safe).

    Raises:
        PeerTlsError: the stored settings cannot be loaded (e.g. a certificate without its key).
    """
    if tls.client_cert.strip() and not tls.client_key.strip():
        raise PeerTlsError("a client certificate is configured without its private key; set the key (`manage.py peer tls`)")
    try:
        context = ssl.create_default_context(cadata=tls.ca_bundle) if tls.ca_bundle.strip() else _default_context()
    except ssl.SSLError as exc:
        raise PeerTlsError(f"the CA bundle cannot be loaded: {exc.reason or exc}") from exc
    if tls.client_cert.strip():
        try:
            with _pem_file(tls.client_cert, "cert.pem") as cert_path, _pem_file(tls.client_key, "key.pem") as key_path:
                context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise PeerTlsError(f"the client certificate and key cannot be loaded: {exc.reason or exc}") from exc
    return context


# --- errors --------------------------------------------------------------------------------------

_VERIFY_HINTS = {
    10: "the peer's certificate has expired",
    62: "the certificate does not name the host in the peer's URL",
    64: "the certificate does not name the host in the peer's URL",
}
"""OpenSSL verify codes (X509_V_ERR_*) whose fix is not a CA bundle."""

_ALERT_HINTS = (
    ("CERTIFICATE_REQUIRED", "the peer requires a client certificate (mutual TLS); configure one for this peer"),
    ("UNKNOWN_CA", "the peer does not trust this gateway's client certificate"),
    ("BAD_CERTIFICATE", "the peer refused this gateway's client certificate"),
    ("CERTIFICATE_UNKNOWN", "the peer refused this gateway's client certificate"),
    ("CERTIFICATE_EXPIRED", "the peer says this gateway's client certificate has expired"),
    ("WRONG_VERSION_NUMBER", "the peer does not speak TLS on this port (should the URL be http://?)"),
    ("RECORD_LAYER_FAILURE", "the peer does not speak TLS on this port (should the URL be http://?)"),
)


def describe_tls_error(exc: ssl.SSLError) -> str:
    """Say in an operator's words why a TLS handshake with a peer failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = (exc.verify_message or exc.reason or "unknown reason").rstrip(".")
        hint = _VERIFY_HINTS.get(exc.verify_code, "configure the peer's CA bundle if it uses a private CA")
        return f"TLS certificate verify failed: {reason}; {hint}"
    reason = str(exc.reason or exc)
    for marker, hint in _ALERT_HINTS:
        if marker in reason.upper():
            return f"TLS handshake failed: {hint} ({reason.lower()})"
    return f"TLS handshake failed: {reason.lower()}"
