"""`manage.py gateway trust|list|untrust`: which peer gateways may call this one for their users.

    gateway trust acme --issuer https://mcp.acme.example [--jwks-url URL | --jwks-file PATH]

creates a client-credentials OAuth application for the gateway `acme` and prints its client id
and secret once, for acme's operator to register this gateway with (`peer add … --gateway
--client-id … --client-secret-file …` there). acme may then call here with a `gateway`-scoped
token and assert users of its own issuer only.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from identity.models import TrustedGateway
from identity.trust.gateways import TrustConfigError, gateway_trust, gateway_untrust


class Command(BaseCommand):
    help = "Manage trusted peer gateways: gateways allowed to call this one on behalf of their own users."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{trust,list,untrust}")
        trust = sub.add_parser("trust", help="Trust a gateway and print the client credentials it authenticates with.")
        trust.add_argument("name", help="A name for it here (lowercase letters, digits, hyphens).")
        trust.add_argument("--issuer", required=True, help="Its issuer: its public URL, exactly as its assertions name it.")
        keys = trust.add_mutually_exclusive_group()
        keys.add_argument("--jwks-url", default="", help="Where its public keys are (default: <issuer>/.well-known/jwks.json).")
        keys.add_argument("--jwks-file", default="", metavar="PATH", help="Its public keys as a JWK Set file, instead of fetching them.")
        sub.add_parser("list", help="List trusted gateways.")
        untrust = sub.add_parser("untrust", help="Stop trusting a gateway; its credentials and tokens are deleted.")
        untrust.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"_{options['action']}")(options)

    def _trust(self, options: dict[str, Any]) -> None:
        jwks = None
        if options["jwks_file"]:
            try:
                jwks = json.loads(Path(options["jwks_file"]).read_text())
            except (OSError, ValueError) as exc:
                raise CommandError(f"cannot read a JWK Set from --jwks-file: {exc}") from exc
        try:
            gateway, secret = gateway_trust(name=options["name"], issuer=options["issuer"], jwks_url=options["jwks_url"], jwks=jwks)
        except TrustConfigError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            "\n".join(
                [
                    f"Trusted gateway {gateway.name} (issuer {gateway.issuer}, keys {'inline' if gateway.jwks else gateway.keys_url()}).",
                    "Give its operator these credentials; the secret is shown only now:",
                    f"client_id: {gateway.application.client_id}",
                    f"client_secret: {secret}",
                ]
            )
        )

    def _list(self, options: dict[str, Any]) -> None:
        gateways = list(TrustedGateway.objects.select_related("application"))
        if not gateways:
            self.stdout.write("No trusted gateways. Add one with `manage.py gateway trust NAME --issuer URL`.")
            return
        for gateway in gateways:
            state = "enabled" if gateway.enabled else "disabled"
            keys = "inline" if gateway.jwks else gateway.keys_url()
            self.stdout.write(
                f"{gateway.name:<20} {state:<9} issuer={gateway.issuer}  client_id={gateway.application.client_id}  "
                f"keys={keys}  identities={gateway.identities.count()}"
            )

    def _untrust(self, options: dict[str, Any]) -> None:
        try:
            gateway = TrustedGateway.objects.select_related("application").get(name=options["name"])
        except TrustedGateway.DoesNotExist as exc:
            raise CommandError(f"no trusted gateway named {options['name']!r}; see `manage.py gateway list`") from exc
        gateway_untrust(gateway=gateway)
        self.stdout.write(f"No longer trusting {options['name']}")
