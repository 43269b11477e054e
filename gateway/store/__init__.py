"""Store selection: `open_store(config)` turns the `store:` setting into a sync store."""

from __future__ import annotations

from typing import Any

from gateway.auth.secrets import SecretBox
from gateway.store.base import AsyncStore, Conflict, NotFound, Store, StoreError, ValidationError

__all__ = ["AsyncStore", "Conflict", "NotFound", "Store", "StoreConfigError", "StoreError",
           "ValidationError", "open_async_store", "open_store"]


class StoreConfigError(ValueError):
    """The `store:` setting cannot be used; the message is one line."""


def open_store(config: Any, create: bool = True) -> Store:
    """Open the store named by `config.store`, with secrets keyed by `config.secret_key_file`.

    ``create=False`` (the CLI): a store or key that does not exist yet is an error naming the path,
    never a new empty store next to wherever the command happened to run."""
    url = getattr(config, "store", None)
    if not isinstance(url, str) or not url:
        raise StoreConfigError("config key store: expected sqlite:PATH or redis://HOST:PORT/DB")
    if url.startswith("redis://") or url.startswith("rediss://"):
        raise StoreConfigError("config key store: a redis:// store has no blocking interface; "
                               "use open_async_store")
    if not url.startswith("sqlite:"):
        raise StoreConfigError("config key store: expected sqlite:PATH or redis://HOST:PORT/DB")
    path = url[len("sqlite:"):]
    if path.startswith("//"):  # tolerate sqlite:///abs/path
        path = path[2:]
    if not path:
        raise StoreConfigError("config key store: sqlite: needs a file path, e.g. sqlite:var/gateway.db")
    key_file = getattr(config, "secret_key_file", None) or "var/secret.key"
    if not create:
        from pathlib import Path

        for what, where in (("store", path), ("secret key", key_file)):
            if not Path(where).exists():
                raise StoreConfigError(
                    f"no {what} at {Path(where).resolve()}: the gateway creates it on its first start; "
                    f"to use an existing one pass --config or set GATEWAY_CONFIG")
    box = SecretBox.from_file(key_file)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(path, box)


def open_async_store(config: Any, reactor: Any, create: bool = True) -> Any:
    """The store contract (Deferred-returning methods) for `config.store`: SQLite behind its worker
    thread, or Redis (`redis://[user:password@]host:port/db`, `rediss://` for TLS) natively."""
    url = getattr(config, "store", None)
    if isinstance(url, str) and (url.startswith("redis://") or url.startswith("rediss://")):
        from gateway.store.redis import RedisStore, parse_url

        try:
            parse_url(url)
        except ValueError as e:
            raise StoreConfigError(f"config key store: {e}") from None
        key_file = getattr(config, "secret_key_file", None) or "var/secret.key"
        if not create:
            from pathlib import Path

            if not Path(key_file).exists():
                raise StoreConfigError(f"no secret key at {Path(key_file).resolve()}: every gateway on this Redis "
                                       "uses the same key file; copy it here or pass --config")
        return RedisStore(url, SecretBox.from_file(key_file))
    return AsyncStore(open_store(config, create=create), reactor)
