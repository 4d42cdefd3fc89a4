"""A throwaway PKI for TLS tests: a CA, a server certificate for loopback and a client certificate.

Everything is generated in memory with `cryptography` (EC P-256 keys: fast) and written to a
temporary folder only when a process needs files (`Pki.write`). `https_fixture_server` runs the
fixture MCP server over HTTPS with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.harness import PY, ROOT, free_port, stop

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    cert: str
    key: str


class Authority:
    """A CA that issues server and client certificates."""

    def __init__(self, name: str = "fedmcp test CA", *, days: int = 30) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self.name = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            # A negative `days` makes a CA that expired that many days ago.
            .not_valid_before(now - timedelta(hours=1) if days > 0 else now - timedelta(days=60))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return _cert_pem(self.cert)

    def issue(
        self, common_name: str, *, hosts: tuple[str, ...] = (), client: bool = False,
        valid_from: datetime | None = None, valid_until: datetime | None = None,
    ) -> Issued:
        """Issue a leaf certificate: a server one naming `hosts`, or a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - timedelta(hours=1))
            .not_valid_after(valid_until or now + timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(cert=_cert_pem(builder.sign(self.key, hashes.SHA256())), key=_key_pem(key))


@dataclass
class Pki:
    """A CA, a loopback server certificate and a client certificate it signed."""

    ca: Authority
    server: Issued
    client: Issued

    @classmethod
    def create(cls) -> Pki:
        ca = Authority()
        return cls(ca=ca, server=ca.issue("fedmcp test server", hosts=LOOPBACK_NAMES), client=ca.issue("fedmcp test gateway", client=True))

    def write(self, folder: Path) -> dict[str, Path]:
        """Write every PEM into `folder`; return their paths by name."""
        files = {
            "ca": self.ca.pem, "server_cert": self.server.cert, "server_key": self.server.key,
            "client_cert": self.client.cert, "client_key": self.client.key,
        }
        paths = {}
        for name, text in files.items():
            path = folder / f"{name}.pem"
            path.write_text(text)
            path.chmod(0o600)
            paths[name] = path
        return paths


def encrypted_key_pem(password: bytes = b"passphrase") -> str:
    return _key_pem(ec.generate_private_key(ec.SECP256R1()), password)


@contextlib.contextmanager
def https_fixture_server(
    files: dict[str, Path], *, transport: str = "streamable-http", mutual: bool = False, log_dir: Path
) -> Iterator[str]:
    """Run the fixture MCP server over HTTPS with the server certificate in `files` (see `Pki.write`).

    `mutual` requires a client certificate signed by the test CA. Yields the /mcp (or /sse) URL.
    """
    port = free_port()
    command = [
        PY, "-m", "tests.fixtures.everything_server", "--port", str(port), "--transport", transport,
        "--tls-cert", str(files["server_cert"]), "--tls-key", str(files["server_key"]),
    ]
    if mutual:
        command += ["--tls-client-ca", str(files["ca"])]
    log = open(log_dir / f"fixture-https-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, process)
        yield f"https://127.0.0.1:{port}{'/sse' if transport == 'sse' else '/mcp'}"
    finally:
        stop(process)
        log.close()


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until the port accepts TCP connections (an HTTPS probe would need the test CA)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the HTTPS fixture exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the HTTPS fixture did not listen on {port} within {timeout:g}s")
