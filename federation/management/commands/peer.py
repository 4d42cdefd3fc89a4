"""`manage.py peer add|list|refresh|remove|credentials`: manage upstream MCP servers from the shell.

A peer gateway is registered with the client credentials this gateway has there (the other
operator ran `manage.py gateway trust` and sent them):

    peer add acme --url https://mcp.acme.example/mcp --gateway --client-id ID --client-secret-file PATH

and trusted here in turn (`manage.py gateway trust acme --issuer https://mcp.acme.example`): only
then are its names, consent questions and deferral marks believed (identity/trust/gateways.py
`peer_gateway_standing`). A peer that merely says it is a gateway stays a plain MCP server.

The secret is read from a file (never from the command line, where `ps` would show it) and
stored encrypted; `peer list` never shows it.

A peer served over HTTPS with a private CA, or one that requires a client certificate (mTLS):

    peer add acme --url https://mcp.acme.example/mcp --ca-file acme-ca.pem \
        --client-cert-file gw.crt --client-key-file gw.key
    peer tls acme --ca-file new-ca.pem        # replace later; --no-ca, --no-client-cert remove

The key is stored encrypted, like the client secret.

The async services run through `async_to_sync`, not `asyncio.run`: their database work then runs
on this command's thread, not on asgiref's shared one, where its connection would stay open
after the command (in a long-lived caller: tests, `call_command`).
"""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from federation.credentials import PeerCredentialsError
from federation.events import publish_catalog_changed
from federation.models import CatalogKind, Peer, Transport
from federation.services import (
    PeerConfigError,
    SyncReport,
    env_parse,
    peer_add,
    peer_connect_first,
    peer_discover_token_url,
    peer_remove,
    peer_set_credentials,
    peer_set_tls,
    peer_sync_catalog,
)
from federation.upstream.stdio import FIRST_START_TIMEOUT

DEFAULT_CONNECT_TIMEOUT = 10.0


class Command(BaseCommand):
    help = "Manage peers: upstream MCP servers (HTTP, SSE, WebSocket or stdio) behind this gateway."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{add,list,refresh,remove,credentials,tls}")
        add = sub.add_parser("add", help="Register a peer and discover its catalog.")
        add.add_argument("name")
        target = add.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="URL of an HTTP, SSE or WebSocket MCP server.")
        target.add_argument("--command", dest="stdio_command", help='Command line of a stdio server, e.g. "mcp-server-time".')
        add.add_argument(
            "--transport",
            choices=[Transport.STREAMABLE_HTTP, Transport.SSE, Transport.WEBSOCKET],
            default=Transport.STREAMABLE_HTTP,
            help="Transport for --url (default: streamable-http).",
        )
        add.add_argument(
            "--gateway", action="store_true",
            help="The URL is another fedmcp gateway's /mcp. Its catalog is imported under stable, hop-free names once "
            "this gateway trusts it too (`gateway trust NAME --issuer ORIGIN`); never detected automatically. "
            "It is an error if the peer is not a gateway.",
        )
        add.add_argument(
            "--per-identity", action="store_true",
            help="Each user gets their own connection in both eras (stdio: their own process). Without it only "
            "handshake-era sessions are per user; 2026-07-28 connections are shared.",
        )
        add.add_argument("--max-processes", type=int, default=8, help="stdio: most per-user processes per worker (default 8).")
        add.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="Environment for stdio peers.")
        add.add_argument(
            "--connect-timeout", type=float, default=None,
            help=f"Seconds to connect and handshake (default 10; {FIRST_START_TIMEOUT:g} for the first start of an npx/uvx server, which downloads it).",
        )
        add.add_argument("--call-timeout", type=float, default=60.0)
        self._credential_arguments(add)
        add.add_argument(
            "--user-oauth", action="store_true",
            help="Each user connects their own account at the peer's OAuth authorization server (/connect/NAME); "
            "calls carry that user's token. The catalog is listed when the first user connects.",
        )
        add.add_argument(
            "--oauth-client-id", default="", help="With --user-oauth: a client registered for this gateway there (default: registered automatically)."
        )
        add.add_argument("--oauth-client-secret-file", default="", metavar="PATH", help="With --oauth-client-id: file holding its secret.")
        add.add_argument("--oauth-scope", default="", help="With --user-oauth: scopes to ask for (default: what the peer's challenge names).")
        self._tls_arguments(add)
        add.add_argument("--no-sync", action="store_true", help="Do not contact the peer now.")
        add.add_argument(
            "--force", action="store_true",
            help="Keep the peer even if it cannot be reached now (default: a peer that fails its first connection is not added).",
        )
        sub.add_parser("list", help="List peers and their catalog sizes.")
        refresh = sub.add_parser("refresh", help="Re-discover a peer's catalog.")
        refresh.add_argument("name")
        remove = sub.add_parser("remove", help="Remove a peer and its catalog.")
        remove.add_argument("name")
        credentials = sub.add_parser("credentials", help="Set or replace the client credentials this gateway has at a peer gateway.")
        credentials.add_argument("name")
        self._credential_arguments(credentials)
        tls = sub.add_parser("tls", help="Set or remove the CA bundle and client certificate used for an HTTPS/WSS peer.")
        tls.add_argument("name")
        self._tls_arguments(tls)
        tls.add_argument("--no-ca", action="store_true", help="Remove the CA bundle (use the default trust store).")
        tls.add_argument("--no-client-cert", action="store_true", help="Remove the client certificate and key.")

    def _tls_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--ca-file", default="", metavar="PATH",
            help="PEM CA bundle that signs the peer's certificate; only these CAs are then trusted for the peer.",
        )
        parser.add_argument("--client-cert-file", default="", metavar="PATH", help="PEM client certificate for mutual TLS.")
        parser.add_argument("--client-key-file", default="", metavar="PATH", help="Its PEM private key (stored encrypted).")

    def _read_pem(self, options: dict[str, Any], option: str) -> str:
        path = options[option]
        if not path:
            return ""
        flag = "--" + option.replace("_", "-")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {flag}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise CommandError(f"{flag} is not PEM text (DER files convert with `openssl x509 -inform der`)") from exc
        if not text.strip():
            raise CommandError(f"{flag} is empty")
        return text

    def _read_tls(self, options: dict[str, Any]) -> tuple[str, str, str]:
        if bool(options["client_cert_file"]) != bool(options["client_key_file"]):
            raise CommandError("--client-cert-file and --client-key-file go together")
        return (
            self._read_pem(options, "ca_file"),
            self._read_pem(options, "client_cert_file"),
            self._read_pem(options, "client_key_file"),
        )

    def _credential_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--client-id", default="", help="Client id this gateway has at the peer gateway (`gateway trust` there prints it).")
        parser.add_argument("--client-secret-file", default="", metavar="PATH", help="File holding the client secret.")
        parser.add_argument(
            "--token-url", default="", help="The peer's token endpoint (default: discovered from its RFC 9728 / RFC 8414 metadata)."
        )

    def _read_credentials(self, options: dict[str, Any]) -> tuple[str, str]:
        if bool(options["client_id"]) != bool(options["client_secret_file"]):
            raise CommandError("--client-id and --client-secret-file go together")
        if not options["client_secret_file"]:
            return "", ""
        try:
            secret = Path(options["client_secret_file"]).read_text().strip()
        except OSError as exc:
            raise CommandError(f"cannot read --client-secret-file: {exc.strerror}") from exc
        if not secret:
            raise CommandError("--client-secret-file is empty")
        return options["client_id"], secret

    def _discover_token_url(self, peer: Peer) -> None:
        try:
            token_url = async_to_sync(peer_discover_token_url)(peer=peer)
        except PeerCredentialsError as exc:
            self.stderr.write(f"Could not discover the token endpoint: {exc}")
            return
        self.stdout.write(f"Token endpoint of {peer.name}: {token_url}")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"_{options['action']}")(options)

    def _get(self, name: str) -> Peer:
        try:
            return Peer.objects.get(name=name)
        except Peer.DoesNotExist as exc:
            raise CommandError(f"no peer named {name!r}; see `manage.py peer list`") from exc

    def _add(self, options: dict[str, Any]) -> None:
        try:
            env = env_parse(options["env"])
        except PeerConfigError as exc:
            raise CommandError(f"--env: {exc}") from exc
        transport = Transport.STDIO if options["stdio_command"] else options["transport"]
        client_id, client_secret = self._read_credentials(options)
        ca_bundle, client_cert, client_key = self._read_tls(options)
        try:
            peer = peer_add(
                name=options["name"],
                transport=transport,
                url=options["url"] or "",
                command=options["stdio_command"] or "",
                env=env,
                connect_timeout=options["connect_timeout"] if options["connect_timeout"] is not None else DEFAULT_CONNECT_TIMEOUT,
                call_timeout=options["call_timeout"],
                is_gateway=options["gateway"],
                per_identity=options["per_identity"],
                max_processes=options["max_processes"],
                client_id=client_id,
                client_secret=client_secret,
                token_url=options["token_url"],
                user_oauth=options["user_oauth"],
                tls_ca_bundle=ca_bundle,
                tls_client_cert=client_cert,
                tls_client_key=client_key,
            )
        except PeerConfigError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Added peer {peer.name} ({peer.transport} {peer.target()})")
        if peer.user_oauth:
            self._add_user_oauth(peer, options)
            return
        if options["no_sync"]:
            return
        # The first sync is the peer's first health check too: the admin shows its state at once.
        # A peer that cannot be reached is removed again unless --force (the admin's rule too).
        first = async_to_sync(peer_connect_first)(
            peer=peer, force=options["force"], connect_timeout_chosen=options["connect_timeout"] is not None, on_note=self.stdout.write
        )
        if first.connected:
            self._print_report(first.report)
            return
        self._print_diagnostics(first.report)
        if first.kept:
            self._print_report(first.report)
            self.stderr.write(f"Peer kept (--force); run `manage.py peer refresh {peer.name}` once it is reachable.")
            return
        raise CommandError(
            f"could not reach {peer.name}: {first.report.errors['connect']}\n"
            f"The peer was not added; fix the command or URL and add it again, or add --force to keep it anyway."
        )

    def _add_user_oauth(self, peer: Peer, options: dict[str, Any]) -> None:
        from federation import upstream_oauth

        secret = ""
        if options["oauth_client_secret_file"]:
            try:
                secret = Path(options["oauth_client_secret_file"]).read_text().strip()
            except OSError as exc:
                raise CommandError(f"cannot read --oauth-client-secret-file: {exc.strerror}") from exc
        upstream_oauth.oauth_client_configure(peer=peer, client_id=options["oauth_client_id"], client_secret=secret, scope=options["oauth_scope"])
        if not options["no_sync"]:
            try:
                client = async_to_sync(upstream_oauth.oauth_client_discover)(peer=peer)
            except upstream_oauth.UpstreamOAuthError as exc:
                self.stderr.write(f"Could not discover how {peer.name} is authorized: {exc}")
            else:
                self.stdout.write(f"Authorization server of {peer.name}: {client.issuer}")
        where = upstream_oauth.connect_page_url(upstream_oauth.public_base() or "<this gateway>", peer.name)
        self.stdout.write(f"Users connect their accounts at {where}; the catalog is listed when the first one connects.")

    def _list(self, options: dict[str, Any]) -> None:
        peers = list(Peer.objects.all())
        if not peers:
            self.stdout.write("No peers. Add one with `manage.py peer add NAME --url URL` or `--command CMD`.")
            return
        for peer in peers:
            counts = {k: peer.catalog.filter(kind=k).count() for k in ("tool", "resource", "resource_template", "prompt")}
            state = "enabled" if peer.enabled else "disabled"
            self.stdout.write(
                f"{peer.name:<20} {peer.transport:<16} {state:<9} {peer.protocol_version or '-':<11} "
                f"tools={counts['tool']} resources={counts['resource']} templates={counts['resource_template']} "
                f"prompts={counts['prompt']}  {peer.target()}"
                + (f"  client={peer.client_id}" if peer.client_id else "")
                + ("  per-user OAuth" if peer.user_oauth else "")
                + self._tls_summary(peer)
                + (f"  last error: {peer.last_error}" if peer.last_error else "")
            )

    def _refresh(self, options: dict[str, Any]) -> None:
        peer = self._get(options["name"])
        report = self._sync(peer)
        self._print_report(report)
        if "connect" in report.errors:
            self._print_diagnostics(report)
            raise CommandError(f"could not refresh {peer.name}: {report.errors['connect']}")

    def _remove(self, options: dict[str, Any]) -> None:
        peer = self._get(options["name"])
        peer_remove(peer=peer)
        # As the REST API does: hosts connected to the workers drop the peer's tools from their lists.
        async_to_sync(publish_catalog_changed)(options["name"], list(CatalogKind.values))
        self.stdout.write(f"Removed peer {options['name']}")

    def _credentials(self, options: dict[str, Any]) -> None:
        peer = self._get(options["name"])
        client_id, client_secret = self._read_credentials(options)
        try:
            peer_set_credentials(peer=peer, client_id=client_id, client_secret=client_secret, token_url=options["token_url"])
        except PeerConfigError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Credentials of {peer.name} {'replaced' if client_id else 'removed'}")
        if peer.client_id and not peer.token_url:
            self._discover_token_url(peer)

    def _tls(self, options: dict[str, Any]) -> None:
        peer = self._get(options["name"])
        ca_bundle, client_cert, client_key = self._read_tls(options)
        if options["no_ca"] and ca_bundle:
            raise CommandError("--ca-file and --no-ca exclude each other")
        if options["no_client_cert"] and client_cert:
            raise CommandError("--client-cert-file and --no-client-cert exclude each other")
        if not (ca_bundle or client_cert or options["no_ca"] or options["no_client_cert"]):
            raise CommandError("nothing to change: give --ca-file, --client-cert-file/--client-key-file, --no-ca or --no-client-cert")
        try:
            peer_set_tls(
                peer=peer,
                ca_bundle="" if options["no_ca"] else ca_bundle or None,
                client_cert="" if options["no_client_cert"] else client_cert or None,
                client_key="" if options["no_client_cert"] else client_key or None,
            )
        except PeerConfigError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"TLS settings of {peer.name} saved:{self._tls_summary(peer) or ' default trust store, no client certificate'}")
        report = self._sync(peer)
        self._print_report(report)
        if "connect" in report.errors:
            raise CommandError(f"the settings are saved, but {peer.name} cannot be reached with them")

    def _print_diagnostics(self, report: SyncReport) -> None:
        if report.diagnostics:
            self.stderr.write(f"{report.peer} wrote to stderr:\n" + "\n".join(f"  | {line}" for line in report.diagnostics.splitlines()))

    def _sync(self, peer: Peer, **options: Any) -> SyncReport:
        """Sync the catalog and, like the REST API, tell connected hosts what changed (list_changed).

        The news travels over the channel layer: with REDIS_URL it reaches every worker's hosts;
        with the in-memory layer (one process) only this command's own process hears it.
        """
        report = async_to_sync(peer_sync_catalog)(peer=peer, **options)
        if report.changed:
            async_to_sync(publish_catalog_changed)(peer.name, report.changed)
        return report

    def _tls_summary(self, peer: Peer) -> str:
        parts = (["ca-bundle"] if peer.tls_ca_bundle else []) + (["client-cert"] if peer.tls_client_cert else [])
        return f"  tls={','.join(parts)}" if parts else ""

    def _print_report(self, report: SyncReport) -> None:
        if "connect" in report.errors:
            self.stderr.write(f"Could not reach {report.peer}: {report.errors['connect']}")
            return
        counts = ", ".join(f"{n} {k.replace('_', ' ')}s" for k, n in report.counts.items())
        self.stdout.write(f"Synced {report.peer} (protocol {report.protocol_version}): {counts}")
        for kind, error in report.errors.items():
            self.stderr.write(f"  {kind}: {error} (previous entries kept)")
        for warning in report.warnings:
            self.stderr.write(f"  note: {warning}")
