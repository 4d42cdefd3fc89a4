"""`manage.py token --user NAME [--scope …] [--expires …]`: print a bearer token for scripts and tests."""

from __future__ import annotations

import re
from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from identity.hostauth import scopes
from identity.hostauth.tokens import token_create, user_for_token_command

DURATION = re.compile(r"^(\d+)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = DURATION.match(text.strip())
    if not match:
        raise CommandError(f"--expires takes a number of seconds or e.g. 30m, 12h, 7d; got {text!r}")
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


class Command(BaseCommand):
    help = "Mint an access token for a user and print it (operators' scripts and tests)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--user", required=True, help="Username the token acts for.")
        parser.add_argument("--scope", default=" ".join(scopes.MCP_SCOPES), help=f"Space-separated scopes (known: {', '.join(scopes.SCOPES)}).")
        parser.add_argument("--expires", default="1h", help="Lifetime: seconds, or 30m / 12h / 7d (default 1h).")
        parser.add_argument(
            "--resource",
            default="",
            help="Audience (RFC 8707): this gateway's public URL. Default: FEDMCP_PUBLIC_URL, else http://127.0.0.1:8000.",
        )
        parser.add_argument("--create-user", action="store_true", help="Create the user if it does not exist.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = user_for_token_command(options["user"], create=options["create_user"])
        except get_user_model().DoesNotExist as exc:
            raise CommandError(f"no user {options['user']!r}; create one or pass --create-user") from exc
        resource = options["resource"] or settings.FEDMCP_PUBLIC_URL or "http://127.0.0.1:8000"
        try:
            raw = token_create(user=user, scope=options["scope"], expires_in=parse_duration(options["expires"]), resource=resource)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(raw)
