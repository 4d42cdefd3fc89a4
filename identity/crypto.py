"""Secrets at rest: Fernet keys, encrypted model fields, and key rotation.

Peer credentials (a peer gateway's client secret, the environment of stdio peers, which often
holds API keys) are stored encrypted with `MultiFernet`: the first key of
`FEDMCP_SECRETS_KEYS` encrypts, every listed key decrypts. Without configuration a key is
generated on first use into `var/secrets_key` (mode 0600), as the Django secret is.

Encrypted fields hold plaintext in Python and ciphertext in the database. Serialization
(`dumpdata`) writes the ciphertext, and deserialization (`loaddata`) accepts it back, so a dump
holds no secret in the clear and can be restored on a gateway with the same keys.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction


class SecretDecryptionError(Exception):
    """A stored secret cannot be decrypted with any configured key."""


def _local_key_file() -> str:
    """Return the key kept in var/secrets_key, creating it (0600) on first use."""
    path = settings.BASE_DIR / "var" / "secrets_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first; use theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(Fernet.generate_key().decode() + "\n")
    return path.read_text().strip()


@functools.lru_cache(maxsize=4)
def _multi_fernet(configured: str) -> MultiFernet:
    keys = [k for k in re.split(r"[,\s]+", configured) if k]
    try:
        return MultiFernet([Fernet(k) for k in keys])
    except ValueError as exc:
        raise ImproperlyConfigured("FEDMCP_SECRETS_KEYS must be Fernet keys (32 url-safe base64 bytes), comma-separated") from exc


def fernet() -> MultiFernet:
    """Return the keyring: the first configured key encrypts, every key decrypts."""
    return _multi_fernet(settings.FEDMCP_SECRETS_KEYS or _local_key_file())


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    """Return the plaintext of a stored secret.

    Raises:
        SecretDecryptionError: no configured key opens it (a key was removed too early).
    """
    try:
        return fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretDecryptionError(
            "a stored secret cannot be decrypted with FEDMCP_SECRETS_KEYS; was the key that encrypted it removed?"
        ) from exc


def _try_decrypt(value: str) -> str | None:
    try:
        return fernet().decrypt(value.encode()).decode()
    except (InvalidToken, ValueError):
        return None


class EncryptedTextField(models.TextField):
    """Text encrypted at rest; "" stays "" (no secret set)."""

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(str(value))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None or value == "":
            return value
        return decrypt(value)

    def to_python(self, value: Any) -> Any:
        # Only ciphertext made with our own keys decrypts, so this recognises what `dumpdata`
        # wrote (`loaddata`) and leaves plaintext alone.
        if isinstance(value, str) and value:
            plain = _try_decrypt(value)
            if plain is not None:
                return plain
        return super().to_python(value)

    def value_to_string(self, obj: models.Model) -> str:
        return self.get_prep_value(self.value_from_object(obj)) or ""


class EncryptedJSONField(models.JSONField):
    """JSON encrypted at rest: the column holds one JSON string, the Fernet token.

    Rows written before the field was encrypted hold a plain JSON object; they are read as
    they are and encrypted on their next save (the migration and `rotate_secrets` do that).
    """

    def get_prep_value(self, value: Any) -> Any:
        if value is None:
            return None
        return encrypt(json.dumps(value, cls=self.encoder, separators=(",", ":")))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        value = super().from_db_value(value, expression, connection)
        if isinstance(value, str):
            return json.loads(decrypt(value), cls=self.decoder)
        return value  # a row from before encryption: re-encrypted when saved

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str):
            plain = _try_decrypt(value)
            if plain is not None:
                return json.loads(plain, cls=self.decoder)
        return super().to_python(value)

    def value_to_string(self, obj: models.Model) -> Any:
        return self.get_prep_value(self.value_from_object(obj))


ENCRYPTED_FIELDS = (EncryptedTextField, EncryptedJSONField)


def encrypted_fields() -> list[tuple[type[models.Model], list[str]]]:
    """Return every installed model with encrypted fields, and those fields' names."""
    found = []
    for model in apps.get_models():
        names = [f.name for f in model._meta.concrete_fields if isinstance(f, ENCRYPTED_FIELDS)]
        if names:
            found.append((model, names))
    return found


ROTATE_BATCH = 500
"""Rows `secrets_rotate` reads at a time."""


def secrets_rotate() -> int:
    """Re-encrypt every encrypted value with the current (first) key; return the rows rewritten.

    Old keys still decrypt until they are removed from FEDMCP_SECRETS_KEYS; after this, they
    can be.

    Raises:
        SecretDecryptionError: a value cannot be decrypted with any configured key.
    """
    rewritten = 0
    with transaction.atomic():
        for model, names in encrypted_fields():
            manager = model._base_manager
            # Lock every row first, then read them in batches by key. Not `.iterator()`: on
            # PostgreSQL that is a server-side cursor, and a row that cannot be decrypted leaves it
            # open (the error's traceback holds it) until after the rollback; closing it then
            # fails and aborts the enclosing transaction, if there is one.
            keys = list(manager.select_for_update().order_by("pk").values_list("pk", flat=True))
            for start in range(0, len(keys), ROTATE_BATCH):
                for row in manager.filter(pk__in=keys[start : start + ROTATE_BATCH]).only("pk", *names):
                    # Reading decrypted with whichever key fits; update() encrypts with the first.
                    manager.filter(pk=row.pk).update(**{name: getattr(row, name) for name in names})
                    rewritten += 1
    return rewritten
