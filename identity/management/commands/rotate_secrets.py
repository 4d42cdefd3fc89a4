"""`manage.py rotate_secrets`: re-encrypt every stored secret with the current key.

Rotation: put a new Fernet key first in FEDMCP_SECRETS_KEYS (keep the old one after it), restart,
run this, then remove the old key.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from identity.crypto import SecretDecryptionError, encrypted_fields, secrets_rotate


class Command(BaseCommand):
    help = "Re-encrypt every encrypted value with the first key of FEDMCP_SECRETS_KEYS."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            rows = secrets_rotate()
        except SecretDecryptionError as exc:
            raise CommandError(f"{exc} Nothing was changed.") from exc
        models = ", ".join(f"{model._meta.label} ({', '.join(names)})" for model, names in encrypted_fields())
        self.stdout.write(f"Re-encrypted {rows} row(s) with the current key: {models or 'no encrypted fields'}")
