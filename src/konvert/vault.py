"""Secrets at rest (integrations' signing secrets, webhook endpoints' secrets): encrypted with
KONVERT_SECRET_KEY (Fernet) when it is set.

A stored secret is ``fernet:<token>`` or, without a key, ``plain:<secret>``; a database dump
alone then reveals no secret of an encrypting deployment. A value with neither prefix was stored
before its table's secrets were sealed and is read as it is. Several keys (comma-separated) let
the key be rotated: the first encrypts, any decrypts, and `konvert integrations reseal` /
`konvert events reseal` rewrite the stored secrets with the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography.fernet import InvalidToken, MultiFernet

from konvert.errors import ServiceUnavailable
from konvert.settings import secret_keys

if TYPE_CHECKING:
    from konvert.services import Services

_FERNET, _PLAIN = "fernet:", "plain:"


class Vault:
    def __init__(self, services: Services) -> None:
        keys = secret_keys(services.settings)
        self._fernet = MultiFernet(keys) if keys else None

    @property
    def encrypting(self) -> bool:
        return self._fernet is not None

    def seal_one(self, secret: str) -> str:
        return self.seal([secret])[0]

    def open_one(self, stored: str) -> str:
        return self._open(stored)

    def seal(self, secrets: Sequence[str]) -> list[str]:
        if self._fernet is None:
            return [_PLAIN + secret for secret in secrets]
        return [_FERNET + self._fernet.encrypt(secret.encode()).decode() for secret in secrets]

    def open(self, stored: Sequence[str]) -> list[str]:
        return [self._open(one) for one in stored]

    def _open(self, stored: str) -> str:
        if stored.startswith(_PLAIN):
            return stored[len(_PLAIN) :]
        if not stored.startswith(_FERNET):
            return stored
        if self._fernet is None:
            raise ServiceUnavailable("stored secrets are encrypted, and KONVERT_SECRET_KEY is not set")
        try:
            return self._fernet.decrypt(stored[len(_FERNET) :].encode()).decode()
        except InvalidToken:
            raise ServiceUnavailable("a stored secret does not decrypt with KONVERT_SECRET_KEY") from None

    @staticmethod
    def sealed(stored: Sequence[str]) -> bool:
        return all(one.startswith(_FERNET) for one in stored)
