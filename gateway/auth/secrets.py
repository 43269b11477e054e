"""Encryption at rest for stored secrets (refresh/access tokens, passwords, client secrets).

A `SecretBox` wraps one Fernet key (AES-128-CBC + HMAC-SHA256) kept in a key
file next to the store. The key file is created with mode 0600 on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

from cryptography.fernet import Fernet, InvalidToken


class SecretKeyError(ValueError):
    """The key file is unreadable or does not hold a valid key."""


class SecretDecryptError(ValueError):
    """A stored value could not be decrypted (wrong key or corrupted data)."""


class SecretBox:
    """Encrypts and decrypts short strings with one symmetric key."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise SecretKeyError("secret key must be 32 url-safe base64-encoded bytes") from None

    @classmethod
    def generate(cls) -> SecretBox:
        """Return a box with a fresh random key (tests, in-memory use)."""
        return cls(Fernet.generate_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SecretBox:
        """Load the key from path, creating the file (0600, parents made) when absent."""
        key_path = Path(path)
        if not key_path.exists():
            key_path.parent.mkdir(parents=True, exist_ok=True)
            key = Fernet.generate_key()
            try:
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # created concurrently by another process: read theirs
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(key + b"\n")
                return cls(key)
        try:
            data = key_path.read_bytes().strip()
        except OSError as exc:
            raise SecretKeyError(f"cannot read secret key file {str(key_path)!r}: {exc.strerror}") from None
        try:
            return cls(data)
        except SecretKeyError:
            raise SecretKeyError(f"secret key file {str(key_path)!r} does not hold a valid key") from None

    @overload
    def encrypt(self, value: str) -> str: ...
    @overload
    def encrypt(self, value: None) -> None: ...
    def encrypt(self, value: str | None) -> str | None:
        """Encrypt a string to an ASCII token; None stays None."""
        if value is None:
            return None
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    @overload
    def decrypt(self, value: str) -> str: ...
    @overload
    def decrypt(self, value: None) -> None: ...
    def decrypt(self, value: str | None) -> str | None:
        """Decrypt what encrypt() produced; None stays None."""
        if value is None:
            return None
        try:
            return self._fernet.decrypt(value.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretDecryptError("cannot decrypt stored secret (wrong secret key file?)") from None
