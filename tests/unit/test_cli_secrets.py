"""`gateway secrets rotate [--retire]`: every encrypted value of a real store re-encrypted in place."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.secrets import SecretBox, SecretDecryptError, read_key_file
from gateway.auth.tokens import TokenCheck
from gateway.cli import main
from gateway.store.rotate import ENCRYPTED_COLUMNS, EncryptedColumn
from gateway.store.sqlite import SQLiteStore

from test_cli import _store, config  # noqa: F401 (config is a fixture) tests/unit/test_cli.py

PLAINTEXTS = {
    "client": "client-s3cret-value",
    "imap": "imap-pass-s3cret",
    "smtp": "smtp-pass-s3cret",
    "refresh": "refresh-tok-s3cret",
    "access": "access-tok-s3cret",
}
# Where each plaintext is stored encrypted: (table, key, JSON path or None for the whole column)
LOCATIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "client": ("apps", None),
    "imap": ("accounts", ("imap", "auth", "pass")),
    "smtp": ("accounts", ("smtp", "auth", "pass")),
    "refresh": ("accounts", ("oauth2", "refreshToken")),
    "access": ("accounts", ("oauth2", "accessToken")),
}


def _key_file(config: Path) -> Path:
    return config.parent / "var" / "secret.key"


def _run(config: Path, *args: str, stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["--config", str(config), *args])


def _populate(config: Path, capsys, monkeypatch) -> str:
    """An app with a client secret, an account with IMAP/SMTP passwords and OAuth2 refresh and access
    tokens, a plain IMAP account, and an access token; returns the access token."""
    assert _run(config, "app", "add", "--name", "Gmail", "--provider", "gmail", "--client-id", "cid",
                "--client-secret-stdin", stdin=PLAINTEXTS["client"] + "\n", monkeypatch=monkeypatch) == 0
    app_id = capsys.readouterr().out.strip()
    assert _run(config, "account", "add", "--account", "alice", "--email", "alice@gmail.com",
                "--imap-host", "imap.example.com", "--imap-user", "alice", "--imap-pass-stdin",
                "--smtp-host", "smtp.example.com", "--smtp-user", "alice", "--smtp-pass-stdin",
                "--oauth2-app", app_id, "--refresh-token-stdin",
                stdin=f"{PLAINTEXTS['imap']}\n{PLAINTEXTS['smtp']}\n{PLAINTEXTS['refresh']}\n",
                monkeypatch=monkeypatch) == 0
    assert _run(config, "account", "add", "--account", "bob", "--email", "bob@example.com",
                "--imap-host", "imap.example.com", "--imap-user", "bob", "--imap-pass-stdin",
                stdin="bob-pass-s3cret\n", monkeypatch=monkeypatch) == 0
    store = _store(config)
    try:
        store.set_oauth_tokens("alice", PLAINTEXTS["access"], 2000000000.0)
    finally:
        store.close()
    assert _run(config, "token", "create", "--account", "alice", "--scope", "imap-proxy",
                "--description", "laptop") == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _ciphertexts(config: Path) -> dict[str, str]:
    """The stored (encrypted) form of each value in PLAINTEXTS, read with plain sqlite3."""
    db = sqlite3.connect(config.parent / "var" / "gateway.db")
    try:
        secret = db.execute("SELECT secret FROM apps").fetchone()[0]
        alice = json.loads(db.execute("SELECT data FROM accounts WHERE account = 'alice'").fetchone()[0])
    finally:
        db.close()
    found: dict[str, str] = {}
    for name, (table, path) in LOCATIONS.items():
        if path is None:
            found[name] = secret
        else:
            node: Any = alice
            for step in path:
                node = node[step]
            found[name] = node
    return found


def _raw_bytes(config: Path) -> bytes:
    base = config.parent / "var"
    return b"".join(p.read_bytes() for p in base.iterdir() if p.name.startswith("gateway.db"))


def _decrypts_all(box: SecretBox, ciphertexts: dict[str, str]) -> None:
    assert {name: box.decrypt(value) for name, value in ciphertexts.items()} == PLAINTEXTS


def test_rotate_then_retire_reencrypts_every_secret(config: Path, capsys, monkeypatch) -> None:
    token = _populate(config, capsys, monkeypatch)
    (old_key,) = read_key_file(_key_file(config))
    before = _ciphertexts(config)
    _decrypts_all(SecretBox(old_key), before)

    assert _run(config, "secrets", "rotate") == 0
    out, err = capsys.readouterr()
    assert out == (f"rotated secrets of 1 apps, 2 accounts with a new key; the previous key stays in "
                   f"{_key_file(config)} for running gateways until \"gateway secrets rotate --retire\"\n")
    assert err == ""
    keys = read_key_file(_key_file(config))
    assert len(keys) == 2 and keys[1] == old_key
    new_key = keys[0]
    assert stat.S_IMODE(os.stat(_key_file(config)).st_mode) == 0o600
    rotated = _ciphertexts(config)
    assert all(rotated[name] != before[name] for name in PLAINTEXTS)  # every encrypted column
    _decrypts_all(SecretBox(new_key), rotated)
    raw = _raw_bytes(config)
    for plaintext in (*PLAINTEXTS.values(), "bob-pass-s3cret"):
        assert plaintext.encode() not in raw
    for key in keys:  # neither the keys nor the secrets were printed
        assert key.decode() not in out
    assert not any(p in out for p in PLAINTEXTS.values())
    store = _store(config)  # what a restarted gateway sees: both keys
    try:
        assert store.get_account("alice", with_secrets=True)["oauth2"]["refreshToken"] == PLAINTEXTS["refresh"]
    finally:
        store.close()

    assert _run(config, "secrets", "rotate", "--retire") == 0
    out = capsys.readouterr().out
    assert out == (f"re-encrypted secrets of 1 apps, 2 accounts with the current key; removed 1 older key "
                   f"from {_key_file(config)}\n")
    assert read_key_file(_key_file(config)) == [new_key]
    assert stat.S_IMODE(os.stat(_key_file(config)).st_mode) == 0o600
    retired = _ciphertexts(config)
    _decrypts_all(SecretBox(new_key), retired)
    for value in retired.values():
        with pytest.raises(SecretDecryptError):
            SecretBox(old_key).decrypt(value)
    raw = _raw_bytes(config)
    assert not any(p.encode() in raw for p in PLAINTEXTS.values())
    store = _store(config)
    try:
        assert store.verify_token(token, "imap-proxy", "127.0.0.1", "alice")[0] is TokenCheck.OK
        alice = store.get_account("alice", with_secrets=True)
        assert alice["imap"]["auth"]["pass"] == PLAINTEXTS["imap"]
        assert store.get_account("bob", with_secrets=True)["imap"]["auth"]["pass"] == "bob-pass-s3cret"
        assert store.get_app(alice["oauth2"]["provider"], with_secret=True)["clientSecret"] == PLAINTEXTS["client"]
    finally:
        store.close()
    assert sorted(p.name for p in _key_file(config).parent.iterdir() if "secret" in p.name) == ["secret.key"]


def test_a_failure_while_reencrypting_leaves_the_data_readable(config: Path, capsys, monkeypatch) -> None:
    _populate(config, capsys, monkeypatch)
    (old_key,) = read_key_file(_key_file(config))
    before = _ciphertexts(config)
    real_rotate = SecretBox.rotate
    calls: list[str] = []

    def failing(self: SecretBox, value: str) -> str:
        calls.append(value)
        if len(calls) == 3:  # after the app and part of an account were re-encrypted
            raise sqlite3.OperationalError("database or disk is full")
        return real_rotate(self, value)

    monkeypatch.setattr(SecretBox, "rotate", failing)
    assert _run(config, "secrets", "rotate") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("gateway: rotation failed: database or disk is full; the stored secrets are unchanged")
    assert _ciphertexts(config) == before  # rolled back
    keys = read_key_file(_key_file(config))
    assert len(keys) == 2 and keys[1] == old_key  # the new key was written first: the file decrypts all
    _decrypts_all(SecretBox.from_file(_key_file(config)), before)
    store = _store(config)
    try:
        assert store.get_account("alice", with_secrets=True)["smtp"]["auth"]["pass"] == PLAINTEXTS["smtp"]
    finally:
        store.close()

    monkeypatch.setattr(SecretBox, "rotate", real_rotate)  # running it again works
    assert _run(config, "secrets", "rotate") == 0
    assert len(read_key_file(_key_file(config))) == 3
    assert _run(config, "secrets", "rotate", "--retire") == 0
    _decrypts_all(SecretBox(read_key_file(_key_file(config))), _ciphertexts(config))
    assert "removed 2 older keys" in capsys.readouterr().out


def test_values_a_running_gateway_writes_with_the_old_key_are_picked_up_by_retire(
        config: Path, capsys, monkeypatch) -> None:
    """A gateway started before the rotation keeps encrypting with the old key until it notices;
    --retire re-encrypts what it wrote, and the gateway reads the rotated values meanwhile."""
    _populate(config, capsys, monkeypatch)
    (old_key,) = read_key_file(_key_file(config))
    frozen = SecretBox.from_file(_key_file(config), clock=lambda: 0.0)  # never looks at the file by itself
    running = SQLiteStore(str(config.parent / "var" / "gateway.db"), frozen)
    try:
        assert _run(config, "secrets", "rotate") == 0
        running.set_oauth_tokens("alice", "access-after-rotation", 2000000000.0)
        assert SecretBox(old_key).decrypt(_ciphertexts(config)["access"]) == "access-after-rotation"
        # reading a rotated value makes it re-read the key file
        assert running.get_account("alice", with_secrets=True)["oauth2"]["refreshToken"] == PLAINTEXTS["refresh"]
        assert _run(config, "secrets", "rotate", "--retire") == 0
        (current,) = read_key_file(_key_file(config))
        stored = _ciphertexts(config)
        assert SecretBox(current).decrypt(stored["access"]) == "access-after-rotation"
        assert running.get_account("alice", with_secrets=True)["oauth2"]["accessToken"] == "access-after-rotation"
        running.set_oauth_tokens("alice", "access-after-retire", 2000000000.0)  # with the current key
        assert SecretBox(current).decrypt(_ciphertexts(config)["access"]) == "access-after-retire"
    finally:
        running.close()


def test_missing_key_file_is_one_error_line_and_nothing_is_created(config: Path, capsys) -> None:
    _key_file(config).unlink()
    for args in (("secrets", "rotate"), ("secrets", "rotate", "--retire")):
        assert _run(config, *args) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("gateway: no secret key at ") and err.count("\n") == 1
        assert sorted(p.name for p in _key_file(config).parent.iterdir()) == ["gateway.db"]


def test_retire_refuses_while_an_unregistered_column_holds_old_ciphertext(config: Path, capsys,
                                                                          monkeypatch) -> None:
    """The safety net for a new encrypted column someone forgot to register: --retire changes nothing;
    registering it in ENCRYPTED_COLUMNS (here with a "*" path) makes rotation cover it."""
    _populate(config, capsys, monkeypatch)
    store = _store(config)
    try:
        sealed = SecretBox.from_file(_key_file(config)).encrypt("verifier-s3cret")
        store.put_settings("pending", {"items": [{"verifier": sealed}, {"verifier": None}]})
    finally:
        store.close()
    assert _run(config, "secrets", "rotate") == 0
    capsys.readouterr()
    keys = read_key_file(_key_file(config))
    assert _run(config, "secrets", "rotate", "--retire") == 1
    err = capsys.readouterr().err
    assert "settings.data row 1" in err and "ENCRYPTED_COLUMNS" in err and err.count("\n") == 1
    assert read_key_file(_key_file(config)) == keys  # the old key stays

    monkeypatch.setattr("gateway.store.rotate.ENCRYPTED_COLUMNS", [
        *ENCRYPTED_COLUMNS, EncryptedColumn("settings", "data", paths=(("items", "*", "verifier"),),
                                            row_name="name", where="name = 'pending'")])
    assert _run(config, "secrets", "rotate", "--retire") == 0
    (current,) = read_key_file(_key_file(config))
    store = SQLiteStore(str(config.parent / "var" / "gateway.db"), SecretBox(current))
    try:
        items = store.get_settings("pending")["items"]
        assert SecretBox(current).decrypt(items[0]["verifier"]) == "verifier-s3cret"
        assert items[1] == {"verifier": None}
    finally:
        store.close()


def test_a_registered_column_that_does_not_exist_is_an_error(config: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("gateway.store.rotate.ENCRYPTED_COLUMNS", [
        *ENCRYPTED_COLUMNS, EncryptedColumn("apps", "no_such_column", row_name="id")])
    keys = read_key_file(_key_file(config))
    assert _run(config, "secrets", "rotate", "--retire") == 1
    assert "no column no_such_column in table apps" in capsys.readouterr().err
    assert read_key_file(_key_file(config)) == keys


def test_restoring_a_backup_made_under_a_retired_key(config: Path, capsys, monkeypatch, tmp_path: Path) -> None:
    """The README's recipe: append the backup's key file to the current one, restore, --retire."""
    _populate(config, capsys, monkeypatch)
    backup, old_key_file = tmp_path / "backup.db", tmp_path / "backup-secret.key"
    assert _run(config, "store", "backup", str(backup)) == 0
    old_key_file.write_bytes(_key_file(config).read_bytes())
    assert _run(config, "secrets", "rotate") == 0
    assert _run(config, "secrets", "rotate", "--retire") == 0
    with _key_file(config).open("ab") as handle:
        handle.write(old_key_file.read_bytes())
    assert _run(config, "store", "restore", str(backup)) == 0
    assert _run(config, "secrets", "rotate", "--retire") == 0
    capsys.readouterr()
    keys = read_key_file(_key_file(config))
    assert len(keys) == 1 and keys != read_key_file(old_key_file)
    _decrypts_all(SecretBox(keys), _ciphertexts(config))
