"""The `gateway` CLI against a real config file and SQLite store in a temp dir."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.cli import main
from gateway.store.sqlite import SQLiteStore


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file and its store, as the gateway's first start leaves them (the CLI creates none)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(f"store: sqlite:{tmp_path}/var/gateway.db\nsecret_key_file: {tmp_path}/var/secret.key\n")
    _store(path).close()
    return path


def _store(config: Path) -> SQLiteStore:
    base = config.parent / "var"
    return SQLiteStore(str(base / "gateway.db"), SecretBox.from_file(base / "secret.key"))


def _run(config: Path, *args: str, stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["--config", str(config), *args])


def _add_alice(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run(config, "account", "add", "--account", "alice", "--email", "alice@example.com",
                "--imap-host", "imap.example.com", "--imap-port", "993", "--imap-secure",
                "--imap-user", "alice", "--imap-pass-stdin",
                stdin="imap-pass-s3cret\n", monkeypatch=monkeypatch) == 0


def test_admin_token_create_prints_only_the_token_and_it_verifies(config: Path, capsys) -> None:
    assert _run(config, "token", "create", "--scope", "api", "--description", "bootstrap") == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and len(token) == 64 and err == ""
    store = _store(config)
    check, record = store.verify_token(token, "api", "127.0.0.1")
    assert check is TokenCheck.OK and record["account"] is None
    store.close()


def test_account_token_with_scopes_and_cidrs(config: Path, capsys, monkeypatch) -> None:
    _add_alice(config, monkeypatch)
    capsys.readouterr()
    assert _run(config, "token", "create", "--account", "alice", "--scope", "imap-proxy", "--scope", "smtp",
                "--cidr", "10.0.0.0/8", "--description", "laptop") == 0
    token = capsys.readouterr().out.strip()
    store = _store(config)
    assert store.verify_token(token, "smtp", "10.2.3.4", account="alice")[0] is TokenCheck.OK
    assert store.verify_token(token, "imap-proxy", "192.0.2.1")[0] is TokenCheck.DENIED_ADDRESS
    store.close()


def test_token_list_shows_no_secrets_and_revoke_by_secret_or_id(config: Path, capsys, monkeypatch) -> None:
    _add_alice(config, monkeypatch)
    _run(config, "token", "create", "--account", "alice", "--scope", "imap-proxy", "--description", "a")
    _run(config, "token", "create", "--account", "alice", "--scope", "smtp", "--description", "b")
    first, second = capsys.readouterr().out.split()[-2:]
    assert _run(config, "token", "list", "--account", "alice") == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["description"] for r in sorted(records, key=lambda r: r["description"])] == ["a", "b"]
    assert first not in out and second not in out
    assert _run(config, "token", "revoke", first) == 0
    by_id = next(r["id"] for r in records if r["description"] == "b")
    assert _run(config, "token", "revoke", by_id) == 0
    store = _store(config)
    assert store.verify_token(first, "imap-proxy", None)[0] is TokenCheck.INVALID
    assert store.verify_token(second, "smtp", None)[0] is TokenCheck.INVALID
    store.close()
    capsys.readouterr()
    assert _run(config, "token", "revoke", by_id) == 1
    assert "not found" in capsys.readouterr().err


def test_account_add_reads_password_from_stdin_and_show_hides_it(config: Path, capsys, monkeypatch) -> None:
    _add_alice(config, monkeypatch)
    assert capsys.readouterr().out == "alice\n"
    assert _run(config, "account", "show", "alice") == 0
    shown = capsys.readouterr().out
    assert json.loads(shown)["imap"] == {"host": "imap.example.com", "port": 993, "secure": True,
                                         "auth": {"user": "alice"}}
    assert "imap-pass-s3cret" not in shown
    assert _run(config, "account", "list") == 0
    assert [json.loads(line)["account"] for line in capsys.readouterr().out.splitlines()] == ["alice"]
    store = _store(config)
    assert store.get_account("alice", with_secrets=True)["imap"]["auth"]["pass"] == "imap-pass-s3cret"
    store.close()


def test_app_add_and_oauth2_account(config: Path, capsys, monkeypatch) -> None:
    assert _run(config, "app", "add", "--name", "Gmail", "--provider", "gmail", "--client-id", "cid",
                "--client-secret-stdin", stdin="client-s3cret\n", monkeypatch=monkeypatch) == 0
    app_id = capsys.readouterr().out.strip()
    assert _run(config, "app", "list") == 0
    listing = capsys.readouterr().out
    assert json.loads(listing)["id"] == app_id and "client-s3cret" not in listing
    assert _run(config, "account", "add", "--account", "bob", "--email", "bob@gmail.com",
                "--oauth2-app", app_id, "--refresh-token-stdin",
                stdin="refresh-s3cret\n", monkeypatch=monkeypatch) == 0
    store = _store(config)
    full = store.get_account("bob", with_secrets=True)
    assert full["oauth2"]["refreshToken"] == "refresh-s3cret" and full["oauth2"]["provider"] == app_id
    store.close()


def test_account_delete(config: Path, capsys, monkeypatch) -> None:
    _add_alice(config, monkeypatch)
    assert _run(config, "account", "delete", "alice") == 0
    assert _run(config, "account", "delete", "alice") == 1
    assert _run(config, "account", "show", "alice") == 1
    assert "not found" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_1(config: Path, capsys) -> None:
    """Invalid input exits 1 with one stderr line and nothing on stdout."""
    for args in (("token", "create", "--scope", "imap-proxy", "--description", "no account"),
                 ("token", "create", "--account", "ghost", "--scope", "smtp", "--description", "x"),
                 ("token", "create", "--scope", "api", "--cidr", "10.0.0.0/99", "--description", "x")):
        assert _run(config, *args) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("gateway: ") and err.count("\n") == 1


def test_usage_errors_exit_2(config: Path, capsys) -> None:
    assert main(["--config", str(config), "token", "create", "--scope", "root", "--description", "x"]) == 2
    assert main(["--config", str(config), "token", "create", "--scope", "api"]) == 2
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_secret_flags_need_stdin_input(config: Path, capsys, monkeypatch) -> None:
    assert _run(config, "account", "add", "--account", "x", "--email", "x@example.com", "--imap-host", "h",
                "--imap-user", "x", "--imap-pass-stdin", stdin="", monkeypatch=monkeypatch) == 1
    assert "stdin" in capsys.readouterr().err


def test_bad_config_is_one_line_exit_1(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stor: sqlite:x.db\n")
    assert main(["--config", str(bad), "account", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stor" in err


def test_store_backup_and_restore(config: Path, capsys, monkeypatch, tmp_path: Path) -> None:
    """backup writes a 0600 copy; after a change, restore brings the backed-up state back, with tokens
    that verify; a file that is not a gateway store is refused and changes nothing."""
    import os
    import stat

    _add_alice(config, monkeypatch)
    capsys.readouterr()
    assert _run(config, "token", "create", "--account", "alice", "--scope", "imap-proxy",
                "--description", "laptop") == 0
    token = capsys.readouterr().out.strip()
    backup = tmp_path / "backup.db"
    assert _run(config, "store", "backup", str(backup)) == 0
    assert "keep the secret key file" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    assert _run(config, "account", "delete", "alice") == 0
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert _run(config, "store", "restore", str(junk)) == 1
    assert "not a gateway store backup" in capsys.readouterr().err
    assert _run(config, "store", "restore", str(backup)) == 0
    assert capsys.readouterr().out == "restored 0 apps, 1 accounts, 1 tokens\n"
    store = _store(config)
    try:
        assert store.verify_token(token, "imap-proxy", "127.0.0.1", "alice")[0] is TokenCheck.OK
        assert store.get_account("alice") is not None
    finally:
        store.close()


def test_close_folds_the_write_ahead_log_into_the_database_file(config: Path, capsys, monkeypatch) -> None:
    """After close, gateway.db alone (copied without its -wal) holds the data."""
    import shutil
    import sqlite3

    _add_alice(config, monkeypatch)
    db = config.parent / "var" / "gateway.db"
    wal = db.with_name("gateway.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = config.parent / "copy.db"
    shutil.copy(db, copy)
    rows = sqlite3.connect(copy).execute("SELECT account FROM accounts").fetchall()
    assert rows == [("alice",)]


def test_relative_paths_in_the_config_file_and_config_discovery(tmp_path: Path, capsys, monkeypatch) -> None:
    """Relative paths name files beside the config file, wherever the CLI runs; $GATEWAY_CONFIG
    finds it; with no config and no store the CLI says so in one line and creates nothing."""
    home = tmp_path / "gw"
    home.mkdir()
    (home / "gateway.yaml").write_text("store: sqlite:var/gateway.db\nsecret_key_file: var/secret.key\n")
    SQLiteStore(str(home / "var" / "gateway.db"), SecretBox.from_file(home / "var" / "secret.key")).close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert main(["account", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gateway: no store at ") and "set GATEWAY_CONFIG" in err and err.count("\n") == 1
    assert list(elsewhere.iterdir()) == []  # nothing invented here
    monkeypatch.setenv("GATEWAY_CONFIG", str(home / "gateway.yaml"))
    assert main(["token", "create", "--scope", "api", "--description", "admin"]) == 0
    assert len(capsys.readouterr().out.strip()) == 64
    store = SQLiteStore(str(home / "var" / "gateway.db"), SecretBox.from_file(home / "var" / "secret.key"))
    try:
        assert len(store.list_tokens()) == 1  # in the store beside the config file
    finally:
        store.close()
    assert list(elsewhere.iterdir()) == []


def test_app_add_from_a_service_account_key_file(config: Path, tmp_path: Path, capsys) -> None:
    """`app add --service-account-json FILE`: a Google service account app, no client secret asked."""
    import json as _json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    key_file = tmp_path / "sa.json"
    key_file.write_text(_json.dumps({"client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1234",
                                     "private_key": pem}))
    assert _run(config, "app", "add", "--name", "ws", "--provider", "gmail",
                "--service-account-json", str(key_file)) == 0
    app_id = capsys.readouterr().out.strip()
    store = _store(config)
    app = store.get_app(app_id, with_secret=True)
    assert app["grant"] == "serviceAccount" and app["serviceKey"] == pem and app["clientId"] == "1234"
    store.close()
    assert _run(config, "app", "add", "--name", "x", "--provider", "gmail", "--client-id", "c") == 1
    assert "--client-secret-stdin is required" in capsys.readouterr().err
