"""Store selection: `open_store(config)` turns the `store:` setting into a sync store."""

from __future__ import annotations

from typing import Any

from gateway.auth.secrets import SecretBox
from gateway.store.base import AsyncStore, Conflict, NotFound, Store, StoreError, ValidationError

__all__ = ["AsyncStore", "Conflict", "NotFound", "Store", "StoreConfigError", "StoreError",
           "ValidationError", "open_store"]


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
        raise StoreConfigError("config key store: redis store not implemented yet")
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
