"""Rotating the key of the secrets at rest (`gateway secrets rotate [--retire]`).

Every place the SQLite store keeps a value encrypted with the `SecretBox` is
listed once, in `ENCRYPTED_COLUMNS`; rotation walks that list and nothing else.
**A new kind of encrypted value must be registered there**, or rotation leaves it
under the old key (`--retire` then refuses to drop the old key, see
`stray_tokens`):

- a column holding one token (or NULL), e.g. ``apps.secret``:
  ``EncryptedColumn("apps", "secret", row_name="id")``;
- a column holding a JSON document with tokens at some paths, e.g. the
  accounts' ``data``: ``EncryptedColumn("accounts", "data", paths=(("oauth2",
  "refreshToken"), ...), row_name="account")``. A path step ``"*"`` means every
  item of a list or every value of an object;
- only some rows: add an SQL condition, e.g. one settings document:
  ``EncryptedColumn("settings", "data", paths=(("key",),), row_name="name",
  where="name = 'oauth2.state_key'")``.

Several entries may name the same table (or even the same column, with other
paths); they are applied in order, in one transaction.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from cryptography.fernet import Fernet

from gateway.auth.secrets import SecretBox, SecretDecryptError, key_file_lock, read_key_file, write_key_file
from gateway.store.base import StoreError
from gateway.store.validation import ACCOUNT_SECRET_PATHS


@dataclass(frozen=True)
class EncryptedColumn:
    """One column of the SQLite store that holds encrypted values."""

    table: str
    column: str
    # Empty: the column's value is one token (or NULL). Otherwise the column holds a JSON document
    # and these are the paths of the tokens in it (missing paths and non-string values are skipped).
    paths: tuple[tuple[str, ...], ...] = ()
    # The column that names a row in error messages (never a secret).
    row_name: str = "rowid"
    # An SQL condition selecting the rows that hold encrypted values (empty: every row).
    where: str = ""


# THE registry: every encrypted value of the SQLite store. Extend it when adding one.
ENCRYPTED_COLUMNS: list[EncryptedColumn] = [
    EncryptedColumn("apps", "secret", row_name="id"),                                  # OAuth2 client secret
    EncryptedColumn("accounts", "data", paths=ACCOUNT_SECRET_PATHS, row_name="account"),  # tokens, passwords
    EncryptedColumn("apps", "service_key", row_name="id"),                             # service account key
    EncryptedColumn("auth_requests", "verifier", row_name="id"),                       # PKCE verifiers
    EncryptedColumn("settings", "data", paths=(("key",),), row_name="name",            # OAuth2 state key
                    where="name = 'oauth2.state_key'"),
]


class RotationError(StoreError):
    """Rotation could not finish; the message is one line and names no secret."""


# A Fernet token: version byte 0x80 and a timestamp starting with zero bytes, base64url-encoded.
_FERNET_TOKEN = re.compile(r"gAAAAA[A-Za-z0-9_\-]{70,}={0,2}")


def _map_json(node: Any, path: tuple[str, ...], fn: Callable[[str], str]) -> bool:
    """Apply fn to the strings at path inside node (in place); True when any changed."""
    if not path:
        return False
    head, rest = path[0], path[1:]
    if head == "*":
        children: list[Any] = list(node.keys()) if isinstance(node, dict) else \
            list(range(len(node))) if isinstance(node, list) else []
    elif isinstance(node, dict) and head in node:
        children = [head]
    else:
        return False
    changed = False
    for child in children:
        if rest:
            changed = _map_json(node[child], rest, fn) or changed
        elif isinstance(node[child], str):
            node[child] = fn(node[child])
            changed = True
    return changed


def _rewrite(value: Any, entry: EncryptedColumn, fn: Callable[[str], str]) -> Any:
    """The column value with fn applied to its encrypted parts, or None when it holds none."""
    if not isinstance(value, str):
        return None
    if not entry.paths:
        return fn(value)
    document = json.loads(value)
    changed = False
    for path in entry.paths:
        changed = _map_json(document, path, fn) or changed
    return json.dumps(document) if changed else None


def _check_registered(db: sqlite3.Connection, columns: list[EncryptedColumn]) -> None:
    for entry in columns:
        names = [row[1] for row in db.execute(f'PRAGMA table_info("{entry.table}")')]
        if not names:
            raise RotationError(f"registered encrypted column {entry.table}.{entry.column}: "
                                f"no table {entry.table} in the store")
        for name in (entry.column, entry.row_name):
            if name != "rowid" and name not in names:
                raise RotationError(f"registered encrypted column {entry.table}.{entry.column}: "
                                    f"no column {name} in table {entry.table}")


def reencrypt_all(db: sqlite3.Connection, box: SecretBox,
                  columns: list[EncryptedColumn] | None = None) -> dict[str, int]:
    """Re-encrypt every registered value under ``box``'s current key (MultiFernet.rotate: any key
    the box holds may have made it). Runs on ``db`` inside the caller's transaction; on an error
    (RotationError naming table, column and row) the caller rolls back. Returns, per table of the
    registry (in its order), how many rows hold encrypted values."""
    columns = ENCRYPTED_COLUMNS if columns is None else columns
    _check_registered(db, columns)
    touched: dict[str, set[int]] = {entry.table: set() for entry in columns}
    for entry in columns:
        condition = f" WHERE {entry.where}" if entry.where else ""
        rows = db.execute(f'SELECT rowid, "{entry.row_name}", "{entry.column}" FROM "{entry.table}"'
                          + condition).fetchall()
        for rowid, name, value in rows:
            try:
                new = _rewrite(value, entry, box.rotate)
            except SecretDecryptError:
                raise RotationError(f"{entry.table}.{entry.column} of {entry.table} row {name}: "
                                    f"no key in the secret key file decrypts it") from None
            except (ValueError, TypeError):  # json.JSONDecodeError is a ValueError
                raise RotationError(f"{entry.table}.{entry.column} of {entry.table} row {name}: "
                                    f"not a JSON document") from None
            if new is None:
                continue
            db.execute(f'UPDATE "{entry.table}" SET "{entry.column}" = ? WHERE rowid = ?', (new, rowid))
            touched[entry.table].add(rowid)
    return {table: len(rowids) for table, rowids in touched.items()}


def stray_tokens(db: sqlite3.Connection, box: SecretBox) -> list[str]:
    """Every column of every table that holds a Fernet token ``box`` cannot decrypt, as
    "table.column row ROWID" (a safety net for encrypted values missing from ENCRYPTED_COLUMNS)."""
    found: list[str] = []
    tables = [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    for table in tables:
        columns = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
        try:
            cursor = db.execute(f'SELECT rowid, * FROM "{table}"')
        except sqlite3.OperationalError:  # a WITHOUT ROWID table: number the rows instead
            cursor = db.execute(f'SELECT NULL, * FROM "{table}"')
        for number, (rowid, *row) in enumerate(cursor, 1):
            for column, value in zip(columns, row):
                if not isinstance(value, str) or "gAAAAA" not in value:
                    continue
                for match in _FERNET_TOKEN.finditer(value):
                    try:
                        box.rotate(match.group(0))
                    except SecretDecryptError:
                        found.append(f"{table}.{column} row {rowid if rowid is not None else number}")
                        break
    return found


@contextmanager
def _transaction(store: Any) -> Iterator[sqlite3.Connection]:
    """The store's own write transaction (BEGIN IMMEDIATE, rolled back on any error)."""
    tx = getattr(store, "_tx", None)
    if tx is None:
        raise RotationError("this store cannot rotate its secret key yet (SQLite stores only)")
    with tx() as db:
        yield db


@dataclass
class RotationResult:
    counts: dict[str, int]  # rows with encrypted values, per table
    keys_before: int
    keys_after: int


def rotate_key(store: Any, key_file: str) -> RotationResult:
    """Step 1: put a new current key in front of the key file (the old ones stay, so every process
    still decrypts everything). Step 2: in one transaction, re-encrypt every registered value with it.

    When step 2 fails it rolls back: the data stays under the old keys, which the file still holds."""
    with key_file_lock(key_file):
        old = read_key_file(key_file)
        new = Fernet.generate_key()
        keys = [new] + [key for i, key in enumerate(old) if key not in old[:i]]
        write_key_file(key_file, keys)
        with _transaction(store) as db:
            counts = reencrypt_all(db, SecretBox(keys))
    return RotationResult(counts, len(old), len(keys))


def retire_keys(store: Any, key_file: str) -> RotationResult:
    """Re-encrypt every registered value with the current key (catching values a running gateway
    wrote with an older one meanwhile), check no Fernet token anywhere needs an older key, then
    rewrite the key file with the current key alone."""
    with key_file_lock(key_file):
        keys = read_key_file(key_file)
        with _transaction(store) as db:
            counts = reencrypt_all(db, SecretBox(keys))
            stray = stray_tokens(db, SecretBox(keys[0]))
            if stray:
                raise RotationError(
                    "values only an older key decrypts remain in " + ", ".join(stray[:5])
                    + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
                    + ": register their column in gateway/store/rotate.py ENCRYPTED_COLUMNS")
        if len(keys) > 1:
            write_key_file(key_file, keys[:1])
    return RotationResult(counts, len(keys), 1)
