"""Token secrets, hashing and the pure token check (scope, revocation, CIDR restrictions)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.tokens import (
    SCOPES,
    TokenCheck,
    address_allowed,
    check_token,
    hash_token,
    looks_like_token,
    new_token,
    validate_cidrs,
    validate_scopes,
)


def _record(secret: str, scopes: tuple[str, ...] = ("imap-proxy",), addresses: list[str] | None = None,
            revoked: bool = False) -> dict:
    return {"hash": hash_token(secret), "scopes": scopes, "revoked": revoked,
            "restrictions": {"addresses": addresses or []}}


def test_scopes_constant_is_the_contract() -> None:
    assert SCOPES == ("imap-proxy", "smtp", "api")


def test_new_token_is_64_lowercase_hex_and_unique() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) == 64 and int(token, 16) >= 0 and token == token.lower()
        assert looks_like_token(token)


def test_hash_token_is_one_sha256_hex() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


def test_looks_like_token_rejects_ids_and_junk() -> None:
    assert not looks_like_token("0123456789abcdef")
    assert not looks_like_token("z" * 64)
    assert not looks_like_token("")


def test_check_ok_for_matching_hash_scope_and_no_restrictions() -> None:
    secret = new_token()
    assert check_token(_record(secret), hash_token(secret), "imap-proxy", "203.0.113.9") is TokenCheck.OK


def test_check_invalid_without_record() -> None:
    assert check_token(None, hash_token("x"), "imap-proxy", "127.0.0.1") is TokenCheck.INVALID


def test_check_wrong_scope() -> None:
    secret = new_token()
    check = check_token(_record(secret), hash_token(secret), "smtp", "127.0.0.1")
    assert check is TokenCheck.WRONG_SCOPE and check.reason == "scope"


def test_check_revoked() -> None:
    secret = new_token()
    record = _record(secret, revoked=True)
    check = check_token(record, hash_token(secret), "imap-proxy", "127.0.0.1")
    assert check is TokenCheck.REVOKED and check.reason == "revoked"


def test_check_invalid_for_hash_mismatch() -> None:
    secret = new_token()
    assert check_token(_record(secret), hash_token(new_token()), "imap-proxy", None) is TokenCheck.INVALID


def test_check_invalid_beats_denied_address() -> None:
    """A wrong token from a disallowed address says INVALID, not which part failed first."""
    secret = new_token()
    record = _record(secret, addresses=["10.0.0.0/8"])
    assert check_token(record, hash_token("other"), "imap-proxy", "192.0.2.1") is TokenCheck.INVALID


@pytest.mark.parametrize("peer, expected", [
    ("10.1.2.3", TokenCheck.OK),
    ("::ffff:10.1.2.3", TokenCheck.OK),
    ("192.0.2.1", TokenCheck.DENIED_ADDRESS),
    ("::ffff:192.0.2.1", TokenCheck.DENIED_ADDRESS),
    ("2001:db8::1", TokenCheck.OK),
    ("2001:db9::1", TokenCheck.DENIED_ADDRESS),
    (None, TokenCheck.DENIED_ADDRESS),
    ("not-an-ip", TokenCheck.DENIED_ADDRESS),
])
def test_check_cidr_restrictions(peer: str | None, expected: TokenCheck) -> None:
    """IPv4 CIDRs match IPv4-mapped IPv6 peers; unknown or missing peers are denied."""
    secret = new_token()
    record = _record(secret, addresses=["10.0.0.0/8", "2001:db8::/32"])
    assert check_token(record, hash_token(secret), "imap-proxy", peer) is expected


def test_address_allowed_without_restrictions_allows_anything() -> None:
    assert address_allowed([], "198.51.100.7")
    assert address_allowed(None, None)


def test_validate_cidrs_canonicalises_and_deduplicates() -> None:
    assert validate_cidrs(["10.1.2.3/8", "10.0.0.0/8", "192.0.2.1", "2001:DB8::/32"]) == [
        "10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32"]
    assert validate_cidrs(None) == []


@pytest.mark.parametrize("bad", [["10.0.0.0/33"], ["abc"], [""], [5], "10.0.0.0/8", [None], ["1.2.3"]])
def test_validate_cidrs_rejects_bad_input_with_message(bad: object) -> None:
    with pytest.raises(ValueError, match="CIDR|addresses"):
        validate_cidrs(bad)


def test_validate_scopes() -> None:
    assert validate_scopes(["smtp", "imap-proxy", "smtp"]) == ["smtp", "imap-proxy"]
    for bad in ([], ["root"], "api", [1]):
        with pytest.raises(ValueError, match="scope"):
            validate_scopes(bad)


@given(st.text(max_size=80), st.sampled_from(SCOPES + ("other",)), st.one_of(st.none(), st.text(max_size=50)))
def test_check_token_never_raises(presented: str, scope: str, peer: str | None) -> None:
    """Any presented value, scope or peer string gives one of the three answers."""
    record = _record(new_token(), addresses=["10.0.0.0/8"])
    assert check_token(record, presented, scope, peer) in TokenCheck
