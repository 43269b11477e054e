"""`gateway secrets rotate [--retire]` while a gateway runs: logins (with OAuth2 refreshes, which
decrypt the refresh token and the app's client secret) keep working through the rotation, for
accounts made before and after it, and after a restart once the old key is retired."""

from __future__ import annotations

from gateway.auth.secrets import SecretBox, read_key_file
from gateway.store.sqlite import SQLiteStore

from .gateway_proc import Gateway, started_gateway


def _login(gw: Gateway, account: str, token: str) -> None:
    conn = gw.imap()
    try:
        assert conn.login(account, token)[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
    finally:
        conn.logout()


def test_a_running_gateway_keeps_serving_through_a_key_rotation(dovecot, oauth2_provider, new_email):
    # No pooling (a pooled upstream connection needs no token) and access tokens that are stale at
    # once (lifetime 1 s, refresh margin 1 s): every login refreshes, decrypting the stored secrets.
    with started_gateway(dovecot, oauth2_provider, "gw-rotate-", imap={"pool": {"idle_ttl": 0}}) as gw:
        key_file = gw.workdir / "secret.key"
        (old_key,) = read_key_file(key_file)
        email = new_email("rotold")
        old_id = email.split("@")[0]
        old_refresh = gw.add_oauth_account(old_id, email, access_lifetime=1)
        old_token = gw.token(old_id)
        _login(gw, old_id, old_token)
        assert oauth2_provider.refresh_count(old_refresh) == 1

        out = gw.cli("secrets", "rotate")
        assert out == (f"rotated secrets of 1 apps, 1 accounts with a new key; the previous key stays in "
                       f"{key_file} for running gateways until \"gateway secrets rotate --retire\"\n")
        keys = read_key_file(key_file)
        assert len(keys) == 2 and keys[1] == old_key

        email2 = new_email("rotnew")  # made by the running gateway after the rotation
        new_id = email2.split("@")[0]
        new_refresh = gw.add_oauth_account(new_id, email2, access_lifetime=1)
        new_token = gw.token(new_id)
        _login(gw, new_id, new_token)
        _login(gw, old_id, old_token)  # its refresh token was re-encrypted under the new key
        assert oauth2_provider.refresh_count(new_refresh) == 1
        assert oauth2_provider.refresh_count(old_refresh) == 2

        out = gw.cli("secrets", "rotate", "--retire")
        assert out == (f"re-encrypted secrets of 1 apps, 2 accounts with the current key; removed 1 older key "
                       f"from {key_file}\n")
        assert read_key_file(key_file) == keys[:1]
        _login(gw, old_id, old_token)  # still running, after --retire
        assert oauth2_provider.refresh_count(old_refresh) == 3

        gw.stop()
        gw.start()  # same work directory: same store and key file (a new admin token and app)
        _login(gw, old_id, old_token)
        _login(gw, new_id, new_token)
        assert oauth2_provider.refresh_count(old_refresh) == 4
        assert oauth2_provider.refresh_count(new_refresh) == 2
        assert "decrypt" not in gw.log_text()

        store = SQLiteStore(str(gw.workdir / "gateway.db"), SecretBox(keys[0]))  # the new key alone
        try:
            for account in (old_id, new_id):
                oauth = store.get_account(account, with_secrets=True)["oauth2"]
                assert oauth["refreshToken"] and oauth["accessToken"]
        finally:
            store.close()
