"""SQLite store: OAuth2 apps, accounts (secrets encrypted) and access tokens (hashes only).

Blocking; the server reaches it through `AsyncStore`'s single worker thread,
the CLI calls it directly. WAL mode and a busy timeout let both share one
database file at once.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from gateway.auth.secrets import SecretBox, SecretDecryptError
from gateway.auth.tokens import TokenCheck, hash_token, looks_like_token
from gateway.store.base import (Conflict, NotFound, TokenRecord, ValidationError, iso_utc, judge_token,
                                 new_token_record, state_view)
from gateway.store.records import AccountRecord, AppRecord
from gateway.store.validation import (
    APP_SECRET_FIELD,
    account_public,
    stored_public,
    app_public,
    map_secrets,
    mask_proxy,
    merge,
    normalize_account,
    normalize_app,
    with_app_defaults,
)

SCHEMA_VERSION = 2  # 2: account proxy URLs encrypted
_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    secret TEXT,
    created REAL NOT NULL,
    service_key TEXT
);
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    account TEXT,
    scopes TEXT NOT NULL,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    addresses TEXT NOT NULL DEFAULT '[]',
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tokens_account ON tokens (account);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS account_state (
    account TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    error TEXT,
    description TEXT,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_requests (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    verifier TEXT NOT NULL,
    created REAL NOT NULL,
    opened INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0
);
"""

# Account states (GET /v1/account/{id} `state`): before anything happened, "connecting".
ACCOUNT_STATES = ("connected", "connecting", "authenticationError", "connectError")


def _state_view(row: sqlite3.Row | None) -> dict[str, Any]:
    if row is None:
        return state_view(None, None, None, None)
    return state_view(row["state"], row["error"], row["description"], row["time"])


class SQLiteStore:
    """The `gateway.store.base.Store` contract on one SQLite file."""

    def __init__(self, path: str, box: SecretBox, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._box = box
        self._clock = clock
        self._lock = threading.RLock()
        if path != ":memory:":
            db_path = Path(path)
            db_path.parent.mkdir(parents=True, exist_ok=True)
            if not db_path.exists():
                os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schema (of a new store, an older one or a restored backup) to this version."""
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("PRAGMA user_version").fetchone()[0] < 2:  # proxies were stored in clear before 2
                for row in db.execute("SELECT account, data FROM accounts").fetchall():
                    doc = json.loads(row["data"])
                    if isinstance(doc.get("proxy"), str) and not doc["proxy"].startswith("gAAAAA"):
                        doc["proxy"] = self._box.encrypt(doc["proxy"])
                        db.execute("UPDATE accounts SET data = ? WHERE account = ?",
                                   (json.dumps(doc), row["account"]))
            columns = {row[1] for row in db.execute("PRAGMA table_info(apps)")}
            if "service_key" not in columns:  # stores made before service accounts
                db.execute("ALTER TABLE apps ADD COLUMN service_key TEXT")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken immediately so concurrent writers queue up."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Fold the write-ahead log into the database file, then close: after a clean shutdown
        `gateway.db` alone holds everything (a plain file copy of it is a backup)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another process holds the database: its own close will checkpoint
            self._db.close()

    def backup(self, target: str) -> None:
        """A consistent copy of the whole store in ``target`` (SQLite's online backup; the gateway
        may be running). Written 0600 to a temporary file, then moved into place."""
        final = Path(target)
        temporary = final.with_name(final.name + ".partial")
        temporary.unlink(missing_ok=True)
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        copy = sqlite3.connect(str(temporary))
        try:
            with self._lock:
                self._db.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
        os.replace(temporary, final)

    def restore(self, source: str) -> dict[str, int]:
        """Replace the store's content with a backup's; returns the record counts restored.

        The file must be a gateway store (same tables); anything else is refused before a byte changes.
        """
        if not Path(source).is_file():
            raise ValidationError(f"{source}: no such file")
        backup = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            try:
                tables = {row[0] for row in backup.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.DatabaseError:
                raise ValidationError(f"{source} is not a gateway store backup") from None
            if not {"accounts", "tokens", "apps"} <= tables:
                raise ValidationError(f"{source} is not a gateway store backup (tables missing)")
            with self._lock:
                backup.backup(self._db)
        finally:
            backup.close()
        self._migrate()
        return {table: self._query(f"SELECT count(*) FROM {table}")[0][0]
                for table in ("apps", "accounts", "tokens")}

    # OAuth2 apps -----------------------------------------------------------

    def create_app(self, data: dict[str, Any]) -> dict[str, Any]:
        """Register an OAuth2 app; returns its public view with the new `id`."""
        app = normalize_app(data)
        secret = app.pop(APP_SECRET_FIELD, None)
        service_key = app.pop("serviceKey", None)
        app_id = secrets.token_hex(6)
        created = self._clock()
        with self._tx() as db:
            db.execute("INSERT INTO apps (id, data, secret, created, service_key) VALUES (?, ?, ?, ?, ?)",
                       (app_id, json.dumps(app), self._box.encrypt(secret), created,
                        self._box.encrypt(service_key)))
        return self._app_view(app_id, app, created)

    def _app_view(self, app_id: str, app: dict[str, Any], created: float) -> dict[str, Any]:
        return {"id": app_id, **app_public(app), "created": iso_utc(created)}

    def get_app(self, app_id: str, with_secret: bool = False) -> dict[str, Any] | None:
        """One app's public view, or with its decrypted `clientSecret` when asked."""
        rows = self._query("SELECT * FROM apps WHERE id = ?", (app_id,))
        if not rows:
            return None
        row = rows[0]
        view = self._app_view(row["id"], json.loads(row["data"]), row["created"])
        if with_secret:
            view[APP_SECRET_FIELD] = self._box.decrypt(row["secret"])
            if row["service_key"] is not None:
                view["serviceKey"] = self._box.decrypt(row["service_key"])
        return view

    def list_apps(self) -> list[dict[str, Any]]:
        """Every app's public view, oldest first."""
        rows = self._query("SELECT * FROM apps ORDER BY created, id")
        return [self._app_view(r["id"], json.loads(r["data"]), r["created"]) for r in rows]

    def delete_app(self, app_id: str) -> bool:
        """Delete an app; Conflict while accounts still use it; False when absent."""
        with self._tx() as db:
            users = [r["account"] for r in db.execute("SELECT account, data FROM accounts")
                     if (json.loads(r["data"]).get("oauth2") or {}).get("provider") == app_id]
            if users:
                raise Conflict(f"OAuth2 app {app_id} is used by accounts: " + ", ".join(sorted(users)[:10]))
            return db.execute("DELETE FROM apps WHERE id = ?", (app_id,)).rowcount > 0

    def _app_exists(self, app_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT id, data FROM apps WHERE id = ?", (app_id,))
        if not rows:
            return None
        return {"id": app_id, "grant": json.loads(rows[0]["data"]).get("grant") or "authorizationCode"}

    # Accounts --------------------------------------------------------------

    def _encrypt_account(self, account: dict[str, Any]) -> str:
        return json.dumps(map_secrets(account, self._box.encrypt))

    def create_account(self, data: dict[str, Any]) -> dict[str, Any]:
        """Add an account; Conflict when the ID is taken. Returns the public view."""
        account = normalize_account(data, self._app_exists)
        now = self._clock()
        with self._tx() as db:
            try:
                db.execute("INSERT INTO accounts (account, data, created, updated) VALUES (?, ?, ?, ?)",
                           (account["account"], self._encrypt_account(account), now, now))
            except sqlite3.IntegrityError:
                raise Conflict(f"account {account['account']} already exists") from None
        return account_public(account, now, now)

    def update_account(self, account_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Deep-merge data into the account (None removes a field); returns the public view."""
        if not isinstance(data, dict):
            raise ValidationError("body must be an object")
        if data.get("account", account_id) != account_id:
            raise ValidationError("account in the body does not match the account being updated")
        with self._tx() as db:
            row = db.execute("SELECT * FROM accounts WHERE account = ?", (account_id,)).fetchone()
            if row is None:
                raise NotFound(f"account {account_id} not found")
            current = map_secrets(json.loads(row["data"]), self._box.decrypt)
            patch = {key: val for key, val in data.items() if key != "account"}
            if current.get("proxy") and patch.get("proxy") == mask_proxy(current["proxy"]):
                del patch["proxy"]  # a GET view sent back unchanged keeps the real password
            account = normalize_account(merge(current, patch), self._app_exists)
            now = self._clock()
            db.execute("UPDATE accounts SET data = ?, updated = ? WHERE account = ?",
                       (self._encrypt_account(account), now, account_id))
            if isinstance(patch.get("oauth2"), dict) and patch["oauth2"].get("refreshToken"):
                # A new grant (re-authorized): whatever the old one's trouble was, it is gone.
                db.execute("INSERT OR REPLACE INTO account_state (account, state, error, description, time) "
                           "VALUES (?, 'connecting', NULL, NULL, ?)", (account_id, now))
        return {**account_public(account, row["created"], now), **self._state_of(account_id)}

    def get_account(self, account_id: str, with_secrets: bool = False) -> dict[str, Any] | None:
        """The public view; with_secrets adds decrypted secrets, `expires` as a float and
        the OAuth2 app's imap/smtp servers where the account has none."""
        rows = self._query("SELECT * FROM accounts WHERE account = ?", (account_id,))
        if not rows:
            return None
        row = rows[0]
        stored = json.loads(row["data"])
        state = self._state_of(account_id)
        if not with_secrets:
            return {**stored_public(stored, self._box.decrypt, row["created"], row["updated"]), **state}
        account = map_secrets(stored, self._box.decrypt)
        app = None
        if "oauth2" in account:
            app = self.get_app(account["oauth2"]["provider"])
        return {**with_app_defaults(account, app), **state}

    def list_accounts(self) -> list[dict[str, Any]]:
        """Every account's public view, ordered by ID."""
        rows = self._query("SELECT * FROM accounts ORDER BY account")
        states = {r["account"]: r for r in self._query("SELECT * FROM account_state")}
        return [{**stored_public(json.loads(r["data"]), self._box.decrypt, r["created"], r["updated"]),
                 **_state_view(states.get(r["account"]))} for r in rows]

    def delete_account(self, account_id: str) -> bool:
        """Delete an account and all its tokens; False when absent."""
        with self._tx() as db:
            found = db.execute("DELETE FROM accounts WHERE account = ?", (account_id,)).rowcount > 0
            db.execute("DELETE FROM tokens WHERE account = ?", (account_id,))
            db.execute("DELETE FROM account_state WHERE account = ?", (account_id,))
        return found

    # Typed records for the data path ------------------------------------------

    def login_account(self, account_id: str) -> AccountRecord | None:
        """The account as logins, refreshes and connections read it (secrets in clear)."""
        doc = self.get_account(account_id, with_secrets=True)
        return AccountRecord.from_document(doc) if doc is not None else None

    def app_record(self, app_id: str) -> AppRecord | None:
        """The OAuth2 app as the token source and the provider client read it (secrets in clear)."""
        doc = self.get_app(app_id, with_secret=True)
        return AppRecord.from_document(doc) if doc is not None else None

    # Account state ---------------------------------------------------------

    def _state_of(self, account_id: str) -> dict[str, Any]:
        rows = self._query("SELECT * FROM account_state WHERE account = ?", (account_id,))
        return _state_view(rows[0] if rows else None)

    def set_account_state(self, account_id: str, state: str, error: str | None = None,
                          description: str | None = None) -> None:
        """Record what the last login or refresh found: `state`, and `lastError` from ``error`` and
        ``description`` (none: cleared)."""
        if state not in ACCOUNT_STATES:
            raise ValidationError(f"unknown account state {state!r}")
        now = self._clock()
        with self._tx() as db:  # only for an account that exists (a login may outlive a deletion)
            db.execute("INSERT OR REPLACE INTO account_state (account, state, error, description, time) "
                       "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM accounts WHERE account = ?)",
                       (account_id, state, error, description, now, account_id))

    # Hosted OAuth2 authorization (pending requests) ------------------------

    def state_key(self) -> bytes:
        """The key OAuth2 `state` values are signed with: made on first use, kept (encrypted) in the
        store so that every gateway on the store checks the others' states. A key that no longer
        decrypts (the secret key was replaced) is made anew: pending authorizations are lost."""
        with self._tx() as db:
            row = db.execute("SELECT data FROM settings WHERE name = 'oauth2.state_key'").fetchone()
            if row is not None:
                try:
                    return base64.urlsafe_b64decode(self._box.decrypt(json.loads(row["data"])["key"]))
                except (SecretDecryptError, ValueError, KeyError, TypeError):
                    pass
            key = secrets.token_bytes(32)
            db.execute("INSERT OR REPLACE INTO settings (name, data, updated) VALUES ('oauth2.state_key', ?, ?)",
                       (json.dumps({"key": self._box.encrypt(base64.urlsafe_b64encode(key).decode())}),
                        self._clock()))
            return key

    def create_auth_request(self, data: dict[str, Any], verifier: str, ttl: float) -> str:
        """Remember a pending authorization (form fields and the PKCE verifier, encrypted); its id.
        Requests older than ``ttl`` are forgotten on the way."""
        request_id = secrets.token_urlsafe(24)
        now = self._clock()
        with self._tx() as db:
            db.execute("DELETE FROM auth_requests WHERE created < ?", (now - ttl,))
            db.execute("INSERT INTO auth_requests (id, data, verifier, created) VALUES (?, ?, ?, ?)",
                       (request_id, json.dumps(data), self._box.encrypt(verifier), now))
        return request_id

    def take_auth_request(self, request_id: str, step: str, ttl: float) -> dict[str, Any]:
        """Use a pending authorization once per ``step`` ("opened": the link, "used": the callback).

        Returns its fields with `verifier`; NotFound when unknown or older than ``ttl``,
        Conflict when that step was taken already (a reused link or state).
        """
        if step not in ("opened", "used"):
            raise ValueError(step)
        with self._tx() as db:
            row = db.execute("SELECT * FROM auth_requests WHERE id = ?", (request_id,)).fetchone()
            if row is None or row["created"] < self._clock() - ttl:
                raise NotFound("this authorization link is unknown or has expired; ask for a new one")
            if row[step]:
                raise Conflict("this authorization link was used already; ask for a new one")
            db.execute(f"UPDATE auth_requests SET {step} = 1 WHERE id = ?", (request_id,))
        return {**json.loads(row["data"]), "verifier": self._box.decrypt(row["verifier"]),
                "created": row["created"]}

    def set_oauth_tokens(self, account_id: str, access_token: str, expires: float,
                         refresh_token: str | None = None) -> None:
        """Store a refreshed access token (and a rotated refresh token when given)."""
        with self._tx() as db:
            row = db.execute("SELECT data FROM accounts WHERE account = ?", (account_id,)).fetchone()
            if row is None:
                raise NotFound(f"account {account_id} not found")
            stored = json.loads(row["data"])
            oauth = stored.get("oauth2")
            if not isinstance(oauth, dict):
                raise ValidationError(f"account {account_id} has no oauth2 settings")
            oauth["accessToken"] = self._box.encrypt(access_token)
            oauth["expires"] = float(expires)
            if refresh_token:
                oauth["refreshToken"] = self._box.encrypt(refresh_token)
            db.execute("UPDATE accounts SET data = ? WHERE account = ?", (json.dumps(stored), account_id))

    # Access tokens ---------------------------------------------------------

    def create_token(self, account: str | None, scopes: list[str], description: str,
                     addresses: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        """Issue a token; returns (secret, public record). The secret is not stored."""
        secret, record = new_token_record(account, scopes, description, addresses, self._clock())
        with self._tx() as db:
            if account is not None and db.execute(
                    "SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is None:
                raise NotFound(f"account {account} not found")
            db.execute(
                "INSERT INTO tokens (id, hash, account, scopes, description, created, addresses)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.hash, record.account, json.dumps(list(record.scopes)),
                 record.description, record.created, json.dumps(list(record.addresses))))
        return secret, record.public()

    @staticmethod
    def _record(row: sqlite3.Row) -> TokenRecord:
        return TokenRecord(id=row["id"], hash=row["hash"], account=row["account"],
                           scopes=tuple(json.loads(row["scopes"])), description=row["description"],
                           created=row["created"], addresses=tuple(json.loads(row["addresses"])),
                           revoked=bool(row["revoked"]))

    def _find_token(self, token_or_id: str) -> TokenRecord | None:
        if not isinstance(token_or_id, str) or not token_or_id:
            return None
        if looks_like_token(token_or_id):
            rows = self._query("SELECT * FROM tokens WHERE hash = ?", (hash_token(token_or_id),))
        else:
            rows = self._query("SELECT * FROM tokens WHERE id = ?", (token_or_id,))
        return self._record(rows[0]) if rows else None

    def verify_token(self, secret: str, scope: str, peer_ip: str | None,
                     account: str | None = None) -> tuple[TokenCheck, dict[str, Any] | None]:
        """Check a presented token for scope, account, revocation and the peer's address.

        Returns (OK | DENIED_ADDRESS, public record) or (INVALID | REVOKED | WRONG_SCOPE, None).
        """
        if not isinstance(secret, str) or not secret:
            return TokenCheck.INVALID, None
        presented = hash_token(secret)
        rows = self._query("SELECT * FROM tokens WHERE hash = ?", (presented,))
        return judge_token(self._record(rows[0]) if rows else None, presented, scope, peer_ip, account)

    def get_token(self, token_or_id: str) -> dict[str, Any] | None:
        """The public record of a token given its secret or its public id."""
        record = self._find_token(token_or_id)
        return record.public() if record is not None and not record.revoked else None

    def list_tokens(self, account: str | None = None) -> list[dict[str, Any]]:
        """Public records of all tokens, or of one account's tokens, oldest first."""
        if account is None:
            rows = self._query("SELECT * FROM tokens WHERE revoked = 0 ORDER BY created, id")
        else:
            rows = self._query("SELECT * FROM tokens WHERE revoked = 0 AND account = ? ORDER BY created, id",
                               (account,))
        return [self._record(r).public() for r in rows]

    def revoke_token(self, token_or_id: str) -> bool:
        """Delete a token given its secret or public id; False when there is none."""
        record = self._find_token(token_or_id)
        if record is None:
            return False
        with self._tx() as db:
            return db.execute("DELETE FROM tokens WHERE id = ?", (record.id,)).rowcount > 0

    # Copy (gateway store copy) ----------------------------------------------

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every record in the backend-neutral form `gateway store copy` moves (ciphertexts as stored)."""
        apps = [{"id": r["id"], "data": json.loads(r["data"]), "secret": r["secret"], "service_key": r["service_key"],
                 "created": r["created"]} for r in self._query("SELECT * FROM apps ORDER BY created, id")]
        accounts = [{"account": r["account"], "data": json.loads(r["data"]), "created": r["created"],
                     "updated": r["updated"]} for r in self._query("SELECT * FROM accounts ORDER BY account")]
        tokens = [{"id": r["id"], "hash": r["hash"], "account": r["account"], "scopes": json.loads(r["scopes"]),
                   "description": r["description"], "created": r["created"],
                   "addresses": json.loads(r["addresses"]), "revoked": bool(r["revoked"])}
                  for r in self._query("SELECT * FROM tokens ORDER BY id")]
        settings = [{"name": r["name"], "data": json.loads(r["data"])}
                    for r in self._query("SELECT * FROM settings ORDER BY name")]
        states = [{"account": r["account"], "state": r["state"], "error": r["error"], "description": r["description"],
                   "time": r["time"]} for r in self._query("SELECT * FROM account_state ORDER BY account")]
        return {"apps": apps, "accounts": accounts, "tokens": tokens, "settings": settings, "states": states}

    def load(self, dump: dict[str, list[dict[str, Any]]]) -> None:
        """Write records from :meth:`dump` (of any backend) in one transaction; same ids are replaced."""
        now = self._clock()
        with self._tx() as db:
            for a in dump.get("apps", []):
                db.execute("INSERT OR REPLACE INTO apps (id, data, secret, created, service_key) VALUES (?, ?, ?, ?, ?)",
                           (a["id"], json.dumps(a["data"]), a.get("secret"), a["created"], a.get("service_key")))
            for a in dump.get("accounts", []):
                db.execute("INSERT OR REPLACE INTO accounts (account, data, created, updated) VALUES (?, ?, ?, ?)",
                           (a["account"], json.dumps(a["data"]), a["created"], a["updated"]))
            for t in dump.get("tokens", []):
                db.execute("DELETE FROM tokens WHERE id = ? OR hash = ?", (t["id"], t["hash"]))
                db.execute("INSERT INTO tokens (id, hash, account, scopes, description, created, addresses, revoked)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (t["id"], t["hash"], t.get("account"), json.dumps(t["scopes"]), t["description"],
                            t["created"], json.dumps(t.get("addresses") or []), int(bool(t.get("revoked")))))
            for st in dump.get("settings", []):
                db.execute("INSERT OR REPLACE INTO settings (name, data, updated) VALUES (?, ?, ?)",
                           (st["name"], json.dumps(st["data"]), now))
            for st in dump.get("states", []):
                db.execute("INSERT OR REPLACE INTO account_state (account, state, error, description, time) "
                           "VALUES (?, ?, ?, ?, ?)", (st["account"], st["state"], st.get("error"),
                                                      st.get("description"), st["time"]))

    # Settings --------------------------------------------------------------

    def get_settings(self, name: str) -> dict[str, Any] | None:
        """One named settings document (e.g. "network"), or None when never saved."""
        rows = self._query("SELECT data FROM settings WHERE name = ?", (name,))
        return json.loads(rows[0]["data"]) if rows else None

    def put_settings(self, name: str, data: dict[str, Any]) -> None:
        """Replace a named settings document (already validated by the caller)."""
        with self._tx() as db:
            db.execute("INSERT INTO settings (name, data, updated) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated = excluded.updated",
                       (name, json.dumps(data), self._clock()))
