"""`manage.py bootstrap`: first-run setup for `make run`, then print where everything is."""

from __future__ import annotations

import os
import secrets
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the first administrator if there is none and print the gateway's endpoints."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")

    def handle(self, *args: Any, **options: Any) -> None:
        base = f"http://{options['host']}:{options['port']}"
        password_file = settings.BASE_DIR / "var" / "admin-password"
        User = get_user_model()
        if not User.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser("admin", "", password)
            password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            self.stdout.write(f"Created administrator 'admin'; the password is in {password_file}")
        self.stdout.write(
            "\n".join(
                [
                    "",
                    f"fedmcp is starting on {base}",
                    f"  Streamable HTTP (both protocol eras): {base}/mcp",
                    f"  WebSocket (subprotocol mcp):         {base.replace('http', 'ws', 1)}/ws",
                    f"  Legacy HTTP+SSE:                     {base}/sse",
                    f"  One peer, unprefixed:                {base}/peers/<name>/mcp  (…/ws, …/sse)",
                    f"  Admin:                               {base}/admin/  (user 'admin', password in {password_file})",
                    "  Add an upstream:  .venv/bin/python manage.py peer add NAME --url URL   (or --command \"CMD ARGS\")",
                    f"  Get a token:      TOKEN=$(.venv/bin/python manage.py token --user admin --resource {base})",
                    "  Hosts with OAuth support sign in through the browser instead (docs/IDENTITY.md).",
                    f"  Consent:          a user's first tool call on a peer is asked about on {base}/consent/",
                    "                    (hosts that cannot show a URL get it in the error: approve, then call again);",
                    f"                    to allow a peer for everyone: {base}/admin/identity/consentpolicy/add/ (peer, decision allow)",
                    "",
                ]
            )
        )
