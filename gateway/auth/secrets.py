"""Encryption at rest for stored secrets (refresh/access tokens, passwords, client secrets).

A `SecretBox` wraps the Fernet keys (AES-128-CBC + HMAC-SHA256) kept in a key
file next to the store, one url-safe base64 key per line. The first key is the
current one: it encrypts. The others are older keys, kept only to decrypt what
they encrypted until `gateway secrets rotate --retire` re-encrypts it and drops
them (see `gateway.store.rotate`). A file with one key is the original format.
The server creates the file (one key, mode 0600) on first use.

A box loaded from a file follows rotations done by another process while it
runs: when no key it holds decrypts a value, it re-reads the file (when the file
changed, else at most once per second) and tries again; before encrypting it
checks at most once per second whether the file changed, so new values get the
new current key.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, overload

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# How long a file-backed box waits before it re-reads an unchanged key file after a failed
# decryption, and between checks of the file before encrypting.
RELOAD_INTERVAL = 1.0


class SecretKeyError(ValueError):
    """The key file is unreadable or does not hold a valid key."""


class SecretDecryptError(ValueError):
    """A stored value could not be decrypted (wrong key or corrupted data)."""


def _fernet(key: bytes | str) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        raise SecretKeyError("secret key must be 32 url-safe base64-encoded bytes") from None


def parse_keys(data: bytes, where: str = "secret key file") -> list[bytes]:
    """The keys in a key file's content, current first; blank lines are ignored."""
    keys: list[bytes] = []
    for number, line in enumerate(data.splitlines(), 1):
        key = line.strip()
        if not key:
            continue
        try:
            _fernet(key)
        except SecretKeyError:
            raise SecretKeyError(f"{where} line {number} does not hold a valid key") from None
        keys.append(key)
    if not keys:
        raise SecretKeyError(f"{where} does not hold a valid key")
    return keys


def read_key_file(path: str | os.PathLike[str]) -> list[bytes]:
    """The keys in an existing key file, current first (SecretKeyError when missing or invalid)."""
    key_path = Path(path)
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise SecretKeyError(f"cannot read secret key file {str(key_path)!r}: {exc.strerror}") from None
    return parse_keys(data, f"secret key file {str(key_path)!r}")


def write_key_file(path: str | os.PathLike[str], keys: Sequence[bytes]) -> None:
    """Atomically replace an existing key file with ``keys`` (current first), one per line.

    A temporary file in the same directory is written, fsynced and renamed over the old one, so a
    reader sees the old content or the new, never a mix. The new file keeps the old one's owner and
    group and is mode 0600 (0640 when the old file was readable by its group)."""
    key_path = Path(path)
    for key in keys:
        _fernet(key)
    if not keys:
        raise SecretKeyError("a secret key file needs at least one key")
    try:
        old = os.stat(key_path)
    except OSError as exc:
        raise SecretKeyError(f"cannot read secret key file {str(key_path)!r}: {exc.strerror}") from None
    mode = 0o600 | (stat.S_IMODE(old.st_mode) & 0o040)
    fd, temporary = tempfile.mkstemp(dir=key_path.parent, prefix=f".{key_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            mine = os.fstat(handle.fileno())
            if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
                try:
                    os.fchown(handle.fileno(), old.st_uid, old.st_gid)
                except OSError as exc:
                    raise SecretKeyError(
                        f"cannot give the new secret key file the owner of {str(key_path)!r} "
                        f"(uid {old.st_uid}, gid {old.st_gid}): {exc.strerror}; run as that user") from None
            handle.write(b"".join(key + b"\n" for key in keys))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, key_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:
        directory = os.open(key_path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)  # the rename itself survives a crash
    except OSError:
        pass
    finally:
        os.close(directory)


@contextmanager
def key_file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Serialise changes of one key file between processes (an flock on its directory: the file
    itself is replaced by every change, and no lock file is left behind)."""
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is replaced or edited (None when it cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)


class SecretBox:
    """Encrypts and decrypts short strings; encrypts with the current key, decrypts with any key held."""

    def __init__(self, key: bytes | str | Sequence[bytes | str], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        keys = [key] if isinstance(key, (bytes, str)) else list(key)
        if not keys:
            raise SecretKeyError("a secret box needs at least one key")
        self._fernet = MultiFernet([_fernet(k) for k in keys])
        self._key_count = len(keys)
        self._clock = clock
        self._path: Path | None = None
        self._signature: tuple[int, int, int, int] | None = None
        self._checked = 0.0   # last look at the file before encrypting
        self._reloaded = 0.0  # last re-read after a failed decryption
        self._lock = threading.Lock()

    @property
    def key_count(self) -> int:
        """How many keys the box holds (the current one and the older ones)."""
        return self._key_count

    @classmethod
    def generate(cls) -> SecretBox:
        """Return a box with a fresh random key (tests, in-memory use)."""
        return cls(Fernet.generate_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *,
                  clock: Callable[[], float] = time.monotonic) -> SecretBox:
        """Load the keys from path, creating the file (one key, 0600, parents made) when absent."""
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
        signature = _signature(key_path)
        box = cls(read_key_file(key_path), clock=clock)
        box._path = key_path
        box._signature = signature
        box._checked = box._reloaded = clock()
        return box

    def _reload(self) -> bool:
        """Re-read the key file; False (keys unchanged) when it cannot be read or is invalid."""
        assert self._path is not None
        signature = _signature(self._path)
        try:
            keys = read_key_file(self._path)
        except SecretKeyError:
            return False  # mid-edit or removed: keep what works
        self._fernet = MultiFernet([_fernet(k) for k in keys])
        self._key_count = len(keys)
        self._signature = signature
        return True

    def _reload_after_failure(self) -> bool:
        """After a failed decryption: re-read the file when it changed, else at most once per
        RELOAD_INTERVAL (a wrong key must not cost a file read per call)."""
        if self._path is None:
            return False
        with self._lock:
            now = self._clock()
            if _signature(self._path) == self._signature and now - self._reloaded < RELOAD_INTERVAL:
                return False
            self._reloaded = self._checked = now
            return self._reload()

    def _follow_file(self) -> None:
        """Before encrypting: pick up a rotated key file (checked at most once per RELOAD_INTERVAL)."""
        if self._path is None:
            return
        with self._lock:
            now = self._clock()
            if now - self._checked < RELOAD_INTERVAL:
                return
            self._checked = now
            if _signature(self._path) != self._signature:
                self._reload()

    @overload
    def encrypt(self, value: str) -> str: ...
    @overload
    def encrypt(self, value: None) -> None: ...
    def encrypt(self, value: str | None) -> str | None:
        """Encrypt a string to an ASCII token with the current key; None stays None."""
        if value is None:
            return None
        self._follow_file()
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def _decrypt(self, value: str) -> str:
        try:
            return self._fernet.decrypt(value.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretDecryptError("cannot decrypt stored secret (wrong secret key file?)") from None

    @overload
    def decrypt(self, value: str) -> str: ...
    @overload
    def decrypt(self, value: None) -> None: ...
    def decrypt(self, value: str | None) -> str | None:
        """Decrypt what encrypt() produced with any key held; None stays None."""
        if value is None:
            return None
        try:
            return self._decrypt(value)
        except SecretDecryptError:
            if not self._reload_after_failure():
                raise
        return self._decrypt(value)

    def rotate(self, value: str) -> str:
        """Re-encrypt a token made with any key held under the current key (no file re-read)."""
        try:
            return self._fernet.rotate(value.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise SecretDecryptError("cannot decrypt stored secret (wrong secret key file?)") from None
