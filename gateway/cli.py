"""The `gateway` command: manage tokens, accounts and OAuth2 apps in the server's store.

Secrets (passwords, refresh tokens, client secrets) are read from stdin,
never from argv, which other users can see in `ps`. When several `--*-stdin`
flags are given, stdin supplies one line per flag in the order they are listed
in `--help`. Output is the bare value for `create`/`add`, JSON lines for
lists and indented JSON for `show`. Exit codes: 0 ok, 1 not found or invalid,
2 usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, TextIO

from twisted.internet import defer, task
from twisted.python.failure import Failure

from gateway.auth.tokens import SCOPES
from gateway.store.base import Conflict, NotFound, StoreError

PROVIDERS = ("gmail", "outlook", "generic")


class CliError(Exception):
    """A failure shown as one line on stderr with exit code 1."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Manage the IMAP/SMTP gateway's store.")
    parser.add_argument("--config", metavar="FILE", help="gateway.yaml (default: built-in defaults)")
    top = parser.add_subparsers(dest="group", metavar="{token,account,app,store,secrets}", required=True)

    token = top.add_parser("token", help="access tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="issue a token; prints it alone on stdout")
    create.add_argument("--account", help="account ID (omit with --scope api for an admin token)")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES, dest="scopes")
    create.add_argument("--cidr", action="append", default=[], dest="cidrs",
                        help="allow only clients from this network (repeatable)")
    create.add_argument("--description", required=True)
    listing = token.add_parser("list", help="list tokens as JSON lines (no secrets)")
    listing.add_argument("--account")
    revoke = token.add_parser("revoke", help="revoke a token by its secret or its id")
    revoke.add_argument("token", metavar="TOKEN_OR_ID")

    account = top.add_parser("account", help="accounts").add_subparsers(dest="action", required=True)
    add = account.add_parser("add", help="add an account; prints its ID")
    add.add_argument("--account", required=True)
    add.add_argument("--email", required=True)
    add.add_argument("--name")
    add.add_argument("--proxy", help="per-account proxy URL, e.g. socks5://host:1080")
    add.add_argument("--local-address", help="source IP for this account's upstream connections")
    _server_args(add, "imap", with_auth=True)
    _server_args(add, "smtp", with_auth=True)
    add.add_argument("--oauth2-app", metavar="APPID")
    add.add_argument("--oauth2-user", metavar="USER", help="login name at the provider (default: email)")
    add.add_argument("--refresh-token-stdin", action="store_true")
    account.add_parser("list", help="list accounts as JSON lines (no secrets)")
    show = account.add_parser("show", help="one account as JSON (no secrets)")
    show.add_argument("account", metavar="ID")
    delete = account.add_parser("delete", help="delete an account and its tokens")
    delete.add_argument("account", metavar="ID")

    app = top.add_parser("app", help="OAuth2 apps").add_subparsers(dest="action", required=True)
    app_add = app.add_parser("add", help="register an OAuth2 app; prints its id")
    app_add.add_argument("--name", required=True)
    app_add.add_argument("--provider", required=True, choices=PROVIDERS)
    app_add.add_argument("--client-id", help="the OAuth2 client ID (not with --service-account-json)")
    app_add.add_argument("--client-secret-stdin", action="store_true",
                         help="read the client secret from stdin (needed except for a service account)")
    app_add.add_argument("--grant", choices=("authorizationCode", "serviceAccount", "clientCredentials"),
                         help="how accounts get tokens (default authorizationCode: each user consents)")
    app_add.add_argument("--service-account-json", metavar="FILE",
                         help="a Google service account's JSON key file (implies --grant serviceAccount)")
    app_add.add_argument("--authorization-url")
    app_add.add_argument("--token-url")
    app_add.add_argument("--oauth-scope", action="append", dest="oauth_scopes",
                         help="OAuth2 scope to request (repeatable; default: the provider's)")
    app_add.add_argument("--authority", help="outlook: common, organizations, consumers or a tenant ID")
    _server_args(app_add, "imap", with_auth=False)
    _server_args(app_add, "smtp", with_auth=False)
    app.add_parser("list", help="list apps as JSON lines (no secrets)")
    app_delete = app.add_parser("delete", help="delete an app no account uses")
    app_delete.add_argument("app", metavar="APPID")

    store = top.add_parser("store", help="the store itself").add_subparsers(dest="action", required=True)
    backup = store.add_parser("backup", help="a consistent copy of the store in FILE (the gateway may run)")
    backup.add_argument("file", metavar="FILE")
    copy = store.add_parser("copy", help="copy every record from one store to another (SQLite <-> Redis); "
                                         "idempotent, verified by counts and checksums")
    copy.add_argument("--from", dest="source", required=True, metavar="STORE",
                      help="sqlite:PATH or redis://HOST:PORT/DB (default secret key file of --config)")
    copy.add_argument("--to", dest="target", required=True, metavar="STORE")
    restore = store.add_parser("restore", help="replace the store's content with the backup in FILE")
    restore.add_argument("file", metavar="FILE")

    keys = top.add_parser("secrets", help="the key of the secrets at rest").add_subparsers(
        dest="action", required=True)
    rotate = keys.add_parser("rotate", help="re-encrypt every stored secret with a new key "
                                            "(the previous key stays in the key file)")
    rotate.add_argument("--retire", action="store_true",
                        help="instead: re-encrypt with the current key and drop the older keys from the key file "
                             "(once every gateway has been restarted since the rotation)")
    return parser


def _server_args(parser: argparse.ArgumentParser, kind: str, with_auth: bool) -> None:
    parser.add_argument(f"--{kind}-host")
    parser.add_argument(f"--{kind}-port", type=int)
    parser.add_argument(f"--{kind}-secure", action=argparse.BooleanOptionalAction, default=None,
                        help="implicit TLS (--no-... for plain/STARTTLS)")
    if with_auth:
        parser.add_argument(f"--{kind}-user")
        parser.add_argument(f"--{kind}-pass-stdin", action="store_true")


class _Secrets:
    """Reads secrets from stdin, one line each; prompts without echo on a terminal."""

    def __init__(self, stdin: TextIO) -> None:
        self.stdin = stdin

    def read(self, what: str) -> str:
        if self.stdin.isatty():
            value = getpass.getpass(f"{what}: ")
        else:
            line = self.stdin.readline()
            if not line:
                raise CliError(f"expected {what} on stdin, got end of input")
            value = line.rstrip("\r\n")
        if not value:
            raise CliError(f"{what} is empty")
        return value


def _server(args: argparse.Namespace, kind: str, secrets: _Secrets | None) -> dict[str, Any] | None:
    host = getattr(args, f"{kind}_host")
    port = getattr(args, f"{kind}_port")
    secure = getattr(args, f"{kind}_secure")
    user = getattr(args, f"{kind}_user", None)
    wants_pass = getattr(args, f"{kind}_pass_stdin", False)
    if host is None:
        if port is not None or secure is not None or user or wants_pass:
            raise CliError(f"--{kind}-host is required with the other --{kind}-* options")
        return None
    server: dict[str, Any] = {"host": host}
    if port is not None:
        server["port"] = port
    if secure is not None:
        server["secure"] = secure
    if user or wants_pass:
        auth: dict[str, Any] = {"user": user}
        if wants_pass and secrets is not None:
            auth["pass"] = secrets.read(f"{kind.upper()} password")
        server["auth"] = auth
    return server


def _print_lines(rows: list[dict[str, Any]], out: TextIO) -> None:
    for row in rows:
        out.write(json.dumps(row, sort_keys=True) + "\n")


async def _token(args: argparse.Namespace, store: Any, out: TextIO, secrets: _Secrets) -> None:
    if args.action == "create":
        secret, _record = await store.create_token(args.account, args.scopes, args.description, args.cidrs or None)
        out.write(secret + "\n")
    elif args.action == "list":
        if args.account is not None and (await store.get_account(args.account)) is None:
            raise NotFound(f"account {args.account} not found")
        _print_lines(await store.list_tokens(args.account), out)
    elif args.action == "revoke":
        if not await store.revoke_token(args.token):
            raise NotFound("token not found")
        out.write("revoked\n")


async def _account(args: argparse.Namespace, store: Any, out: TextIO, secrets: _Secrets) -> None:
    if args.action == "add":
        data: dict[str, Any] = {"account": args.account, "email": args.email, "name": args.name,
                                "proxy": args.proxy, "localAddress": args.local_address}
        data["imap"] = _server(args, "imap", secrets)
        data["smtp"] = _server(args, "smtp", secrets)
        if args.oauth2_app:
            oauth: dict[str, Any] = {"provider": args.oauth2_app}
            if args.oauth2_user:
                oauth["auth"] = {"user": args.oauth2_user}
            if args.refresh_token_stdin:
                oauth["refreshToken"] = secrets.read("OAuth2 refresh token")
            data["oauth2"] = oauth
        elif args.oauth2_user or args.refresh_token_stdin:
            raise CliError("--oauth2-user and --refresh-token-stdin need --oauth2-app")
        created = await store.create_account({k: v for k, v in data.items() if v is not None})
        out.write(created["account"] + "\n")
    elif args.action == "list":
        _print_lines(await store.list_accounts(), out)
    elif args.action == "show":
        account = await store.get_account(args.account)
        if account is None:
            raise NotFound(f"account {args.account} not found")
        out.write(json.dumps(account, indent=2, sort_keys=True) + "\n")
    elif args.action == "delete":
        if not await store.delete_account(args.account):
            raise NotFound(f"account {args.account} not found")
        out.write(f"deleted {args.account}\n")


async def _app(args: argparse.Namespace, store: Any, out: TextIO, secrets: _Secrets) -> None:
    if args.action == "add":
        data: dict[str, Any] = {"name": args.name, "provider": args.provider, "clientId": args.client_id,
                                "authorizationUrl": args.authorization_url, "tokenUrl": args.token_url,
                                "scopes": args.oauth_scopes, "authority": args.authority, "grant": args.grant,
                                "imap": _server(args, "imap", None), "smtp": _server(args, "smtp", None)}
        if args.service_account_json:
            try:
                key = json.loads(Path(args.service_account_json).read_text())
                data.update(grant="serviceAccount", serviceClientEmail=key["client_email"],
                            serviceClient=key.get("client_id"), serviceKey=key["private_key"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CliError(f"{args.service_account_json} is not a service account JSON key file "
                               f"({type(exc).__name__})") from None
        elif not args.client_id:
            raise CliError("--client-id is required (or --service-account-json)")
        if args.client_secret_stdin:
            data["clientSecret"] = secrets.read("OAuth2 client secret")
        elif not args.service_account_json:
            raise CliError("--client-secret-stdin is required: the client secret is read from stdin")
        created = await store.create_app({k: v for k, v in data.items() if v is not None})
        out.write(created["id"] + "\n")
    elif args.action == "list":
        _print_lines(await store.list_apps(), out)
    elif args.action == "delete":
        if not await store.delete_app(args.app):
            raise NotFound(f"OAuth2 app {args.app} not found")
        out.write(f"deleted {args.app}\n")


async def _store(args: argparse.Namespace, store: Any, out: TextIO, secrets: _Secrets) -> None:
    sync = getattr(store, "sync", None)
    backup = getattr(sync, "backup", None)
    if backup is None:
        raise CliError("store backup and restore work on a SQLite store; for Redis use its own persistence "
                       "(RDB/AOF), or gateway store copy --to sqlite:FILE")
    store = sync
    if args.action == "backup":
        backup(args.file)
        out.write(f"backed up to {args.file} (keep the secret key file with it: the secrets "
                  f"in the backup cannot be read without it)\n")
    elif args.action == "restore":
        counts = store.restore(args.file)
        out.write("restored " + ", ".join(f"{n} {table}" for table, n in counts.items()) + "\n")


async def _secrets(args: argparse.Namespace, store: Any, out: TextIO, secrets: _Secrets) -> None:
    """`secrets rotate [--retire]` (see gateway.store.rotate). Prints counts, never a key or a secret."""
    from gateway.store.rotate import retire_keys, rotate_key

    store = getattr(store, "sync", None)
    if store is None:
        raise CliError("secrets rotate works on a SQLite store; with Redis, copy to SQLite, rotate, copy back")
    key_file: str = args.secret_key_file
    try:
        if args.retire:
            result = retire_keys(store, key_file)
        else:
            result = rotate_key(store, key_file)
    except (StoreError, ValueError, OSError, sqlite3.Error) as exc:
        if args.retire:
            raise CliError(f"retiring the older keys failed: {_one_line(exc)}; {key_file} still holds "
                           f"them all") from None
        raise CliError(f"rotation failed: {_one_line(exc)}; the stored secrets are unchanged and "
                       f"{key_file} still holds the keys that decrypt them: run it again") from None
    # apps and accounts always; other tables (pending authorizations, settings) when they had any
    counts = ", ".join(f"{n} {table}" for table, n in result.counts.items()
                       if n or table in ("apps", "accounts"))
    if args.retire:
        dropped = result.keys_before - result.keys_after
        what = (f"removed {dropped} older key{'s' if dropped != 1 else ''} from {key_file}" if dropped
                else f"{key_file} held no older key")
        out.write(f"re-encrypted secrets of {counts} with the current key; {what}\n")
    else:
        out.write(f"rotated secrets of {counts} with a new key; the previous key stays in {key_file} "
                  f"for running gateways until \"gateway secrets rotate --retire\"\n")


_COMMANDS: dict[str, Callable[[argparse.Namespace, Any, TextIO, _Secrets], Awaitable[None]]] = {
    "token": _token, "account": _account, "app": _app, "store": _store, "secrets": _secrets,
}


def _open(config_path: str | None, reactor: Any) -> tuple[Any, str]:
    """The store the configuration names (its contract: Deferred-returning methods) and its secret key
    file; CliError with one line when it cannot be opened."""
    from gateway.config import ConfigError, find_config, load_config
    from gateway.store import open_async_store, open_store
    from gateway.store.base import Immediate

    try:
        config = load_config(find_config(config_path))
        if config.store.startswith("sqlite:"):
            store: Any = Immediate(open_store(config, create=False))
        else:
            store = open_async_store(config, reactor, create=False)
    except (ConfigError, ValueError, OSError, sqlite3.Error) as exc:
        raise CliError(_one_line(exc)) from None
    return store, getattr(config, "secret_key_file", None) or "var/secret.key"


async def _run(args: argparse.Namespace, reactor: Any) -> int:
    if args.group == "store" and args.action == "copy":  # names its own stores
        try:
            await _copy(args, sys.stdout)
        except (CliError, StoreError, ValueError) as exc:
            sys.stderr.write(f"gateway: {_one_line(exc)}\n")
            return 1
        return 0
    try:
        store, args.secret_key_file = _open(args.config, reactor)
    except CliError as exc:
        sys.stderr.write(f"gateway: {_one_line(exc)}\n")
        return 1
    try:
        await _COMMANDS[args.group](args, store, sys.stdout, _Secrets(sys.stdin))
    except (CliError, StoreError, ValueError) as exc:
        prefix = "not found: " if isinstance(exc, NotFound) else "conflict: " if isinstance(exc, Conflict) else ""
        sys.stderr.write(f"gateway: {prefix}{_one_line(exc)}\n")
        return 1
    finally:
        await store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one CLI command; returns the exit code (0 ok, 1 failed, 2 usage).

    Every command is written against the store's asynchronous contract. With a SQLite store it runs
    to the end at once (the store answers without a worker thread here: nothing else shares it), so
    the CLI needs no reactor; with Redis it runs under ``task.react``."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not _needs_reactor(args):
        done = defer.ensureDeferred(_run(args, None))
        results: list[Any] = []
        done.addBoth(results.append)
        if not results:
            raise RuntimeError("a SQLite command waited on something")  # cannot happen: nothing is deferred
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return int(results[0])
    codes: list[int] = []

    def run(reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(_run(args, reactor)).addCallback(codes.append)

    try:
        task.react(run)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    return codes[0] if codes else 1


def _needs_reactor(args: argparse.Namespace) -> bool:
    """Redis (in the configuration or a store copy) needs the reactor; SQLite alone does not."""
    from gateway.config import ConfigError, find_config, load_config

    if args.group == "store" and args.action == "copy":
        return True
    try:
        return not load_config(find_config(args.config)).store.startswith("sqlite:")
    except (ConfigError, OSError, ValueError):
        return False  # _open reports it


async def _copy(args: argparse.Namespace, out: TextIO) -> None:
    """`store copy --from A --to B`: every record of A written into B (same ids replaced), then both
    dumped again and compared kind by kind: counts and a SHA-256 of the canonical records."""
    from twisted.internet import reactor

    from gateway.config import ConfigError, find_config, load_config
    from gateway.store import open_async_store

    try:
        config = load_config(find_config(args.config))
    except (ConfigError, OSError, ValueError) as exc:
        raise CliError(_one_line(exc)) from None
    stores = []
    try:
        for url, create in ((args.source, False), (args.target, True)):
            if url.startswith("sqlite:") and not create and not Path(url[len("sqlite:"):]).exists():
                raise CliError(f"no store at {url}")
            stores.append(open_async_store(_with_store(config, url), reactor, create=create))
        source, target = stores
        dump = await source.dump()
        await target.load(dump)
        copied = await target.dump()
        for kind in ("apps", "accounts", "tokens", "settings", "states"):
            want, got = _digest(dump.get(kind, [])), _digest(_only(copied.get(kind, []), dump.get(kind, [])))
            if want != got:
                raise CliError(f"copy of {kind} does not match ({want[0]} records, checksum {want[1][:12]} "
                               f"vs {got[0]}, {got[1][:12]}): nothing else was changed; run it again")
            out.write(f"{kind}: {want[0]} copied, sha256 {want[1][:16]}\n")
    except StoreError as exc:
        raise CliError(_one_line(exc)) from None
    finally:
        for store in stores:
            await store.close()


def _with_store(config: Any, url: str) -> Any:
    import dataclasses

    return dataclasses.replace(config, store=url)


def _key(kind_record: dict[str, Any]) -> str:
    return str(kind_record.get("id") or kind_record.get("account") or kind_record.get("name"))


def _only(records: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The target's records with the ids the source has (a target may hold more of its own)."""
    keys = {_key(r) for r in wanted}
    return [r for r in records if _key(r) in keys]


def _digest(records: list[dict[str, Any]]) -> tuple[int, str]:
    import hashlib

    canonical = sorted(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records)
    return len(canonical), hashlib.sha256("\n".join(canonical).encode()).hexdigest()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
