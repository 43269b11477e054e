"""Store safety on a running gateway: an online backup taken under load restores with every token
working; after a clean shutdown the database file alone holds everything."""

from __future__ import annotations

import shutil
import sqlite3
import threading

from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.store.sqlite import SQLiteStore

from .gateway_proc import started_gateway


def test_backup_under_load_restores_with_every_token_working(dovecot, oauth2_provider, new_email, tmp_path):
    with started_gateway(dovecot, oauth2_provider, "gw-backup-") as gw:
        email = new_email("backup")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        tokens = [gw.token(account) for _ in range(20)]
        stop = threading.Event()
        made: list[str] = []

        def load() -> None:  # more tokens while the backup runs (bounded)
            while not stop.is_set() and len(made) < 200:
                made.append(gw.token(account))

        writer = threading.Thread(target=load)
        writer.start()
        try:
            out = gw.cli("store", "backup", str(tmp_path / "backup.db"))
        finally:
            stop.set()
            writer.join(30)
        assert out.startswith("backed up to ")
        restored = SQLiteStore(str(tmp_path / "restored.db"), SecretBox.from_file(gw.workdir / "secret.key"))
        try:
            counts = restored.restore(str(tmp_path / "backup.db"))
            assert counts["tokens"] >= 21  # the admin token and the 20 made before the backup
            for token in tokens:
                assert restored.verify_token(token, "imap-proxy", "127.0.0.1", account)[0] is TokenCheck.OK
            assert restored.get_account(account, with_secrets=True)["oauth2"]["refreshToken"]
        finally:
            restored.close()


def test_after_a_clean_shutdown_the_database_file_alone_holds_the_data(dovecot, oauth2_provider, new_email,
                                                                       tmp_path):
    with started_gateway(dovecot, oauth2_provider, "gw-wal-") as gw:
        email = new_email("wal")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        gw.stop()  # SIGTERM: a clean shutdown
        db = gw.workdir / "gateway.db"
        wal = gw.workdir / "gateway.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0
        shutil.copy(db, tmp_path / "copy.db")  # what a naive backup script does
        accounts = [row[0] for row in sqlite3.connect(tmp_path / "copy.db").execute("SELECT account FROM accounts")]
        assert account in accounts
