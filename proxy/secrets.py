"""Variable values encrypted at rest with Fernet; a key list allows rotation.

``DATABROKER_SECRET_KEY`` holds one or more Fernet keys, comma-separated,
newest first: the first encrypts, all decrypt. The embedded default generates
a key file under the data dir; any other deployment must provide the key, since
a generated key would make stored values unreadable on the next pod.

cryptography is imported on the first encryption or decryption, not before: a
serving process whose sources hold no variable or credential never loads it
(7-8 MiB of RSS, README "Footprint"). The keys' form is checked at start without it.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy.errors import StartupError

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

    from proxy.settings import Settings

# A Fernet key: 32 bytes (signing and encryption halves), urlsafe base64.
KEY_BYTES = 32


class SecretKeyError(StartupError):
    """The configured key is missing or malformed, or a stored value needs a key it lacks."""


def parse_keys(keys: list[str]) -> list[bytes]:
    """Fernet keys, newest first; SecretKeyError (never echoing a key) if any is malformed.

    The check Fernet's constructor makes, without importing cryptography.
    """
    if not keys:
        raise SecretKeyError("DATABROKER_SECRET_KEY holds no key")
    parsed = [k.strip().encode() for k in keys]
    for key in parsed:
        try:
            decoded = base64.urlsafe_b64decode(key)
        except binascii.Error:
            decoded = b""
        if len(decoded) != KEY_BYTES:
            raise SecretKeyError(
                "DATABROKER_SECRET_KEY must be Fernet keys (urlsafe base64, 32 bytes),"
                " comma-separated"
            )
    return parsed


class Secrets(Mapping[str, Any]):
    """Decrypted values by name: read like a dict, shown by name only.

    Not a dict subclass on purpose: ``repr``/``str`` (tracebacks, ``%r``) and test
    diffs, which spell out a dict's items, print only the names.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<Secrets: {', '.join(sorted(self._values)) or 'none'}>"


class SecretBox:
    """Encrypts and decrypts with the configured keys; shows none of them."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = parse_keys(keys)

    @cached_property
    def _fernet(self) -> MultiFernet:
        from cryptography.fernet import Fernet, MultiFernet

        return MultiFernet([Fernet(key) for key in self._keys])

    def encrypt(self, value: Any) -> str:
        return self._fernet.encrypt(orjson.dumps(value)).decode()

    def decrypt(self, token: str) -> Any:
        from cryptography.fernet import InvalidToken

        try:
            return orjson.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken as exc:
            raise SecretKeyError(
                "a stored variable cannot be decrypted with DATABROKER_SECRET_KEY"
            ) from exc

    def rotate(self, token: str) -> str:
        """Re-encrypt with the newest key."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretKeyError(
                "a stored variable cannot be decrypted with any key of DATABROKER_SECRET_KEY"
            ) from exc


def load_secret_box(settings: Settings) -> SecretBox:
    if settings.secret_key is not None:
        return SecretBox(settings.secret_key.get_secret_value().split(","))
    if not settings.embedded:
        raise SecretKeyError(
            "DATABROKER_SECRET_KEY is required when DATABROKER_DATABASE_URL is set "
            "(generate one: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')"
        )
    return SecretBox([_embedded_key(settings.data_dir / "secret.key")])


def _embedded_key(path: Path) -> str:
    if not path.exists():
        from cryptography.fernet import Fernet

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return path.read_text().strip()
