"""The OAuth2 app presets and the authorization URL: what a Gmail or Microsoft 365 app becomes."""

from __future__ import annotations

import urllib.parse

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth.provider import authorization_url
from gateway.store.base import ValidationError
from gateway.store.records import AppRecord
from gateway.store.validation import app_public, normalize_app


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_gmail_preset_fills_urls_scopes_and_offline_access() -> None:
    app = normalize_app({"name": "g", "provider": "gmail", "clientId": "cid", "clientSecret": "s"})
    assert app["tokenUrl"] == "https://oauth2.googleapis.com/token"
    assert app["revocationUrl"] == "https://oauth2.googleapis.com/revoke"
    assert app["scopes"] == ["https://mail.google.com/"]
    url = authorization_url(AppRecord.from_document({**app, "id": "a1"}), "https://gw.example/oauth/callback",
                            "st.sig", "v" * 64, login_hint="a@b.example")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    assert query["scope"] == "https://mail.google.com/ openid email"
    assert query["access_type"] == "offline" and query["prompt"] == "consent"
    assert query["code_challenge_method"] == "S256" and query["login_hint"] == "a@b.example"
    assert query["redirect_uri"] == "https://gw.example/oauth/callback" and query["state"] == "st.sig"


def test_outlook_preset_uses_the_authority_everywhere() -> None:
    app = normalize_app({"name": "m", "provider": "outlook", "clientId": "cid", "clientSecret": "s",
                         "authority": "organizations"})
    base = "https://login.microsoftonline.com/organizations"
    assert app["authorizationUrl"] == base + "/oauth2/v2.0/authorize"
    assert app["tokenUrl"] == base + "/oauth2/v2.0/token"
    assert app["jwksUrl"] == base + "/discovery/v2.0/keys"
    assert "offline_access" in app["scopes"] and "revocationUrl" not in app
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
        authorization_url(AppRecord.from_document({**app, "id": "a1"}), "http://127.0.0.1:3000/oauth/callback", "s",
                          "v" * 64)).query))
    assert "access_type" not in query and "openid" in query["scope"].split()


def test_application_access_needs_a_tenant_and_gets_the_default_scope() -> None:
    with pytest.raises(ValidationError, match="tenant ID"):
        normalize_app({"name": "m", "provider": "outlook", "grant": "clientCredentials", "clientId": "c",
                       "clientSecret": "s"})
    app = normalize_app({"name": "m", "provider": "outlook", "grant": "clientCredentials", "clientId": "c",
                         "clientSecret": "s", "authority": "0b8a1c2d-0000-4000-8000-000000000000"})
    assert app["scopes"] == ["https://outlook.office365.com/.default"] and "authorizationUrl" not in app


def test_service_account_key_is_checked_and_never_public() -> None:
    key = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    app = normalize_app({"name": "w", "provider": "gmail", "grant": "serviceAccount",
                         "serviceClientEmail": "sa@p.iam.gserviceaccount.com", "serviceKey": key})
    assert app["serviceKey"] == key and app["clientId"] == "sa@p.iam.gserviceaccount.com"
    assert "authorizationUrl" not in app and app["scopes"] == ["https://mail.google.com/"]
    assert "serviceKey" not in app_public(app)
    for bad in ("not a key", _pem(ec.generate_private_key(ec.SECP256R1()))):
        with pytest.raises(ValidationError, match="serviceKey"):
            normalize_app({"name": "w", "provider": "gmail", "grant": "serviceAccount",
                           "serviceClientEmail": "sa@p", "serviceKey": bad})


@pytest.mark.parametrize("params, message", [
    ({"state": "x"}, "must not set state"),
    ({"prompt": 1}, "object of strings"),
    ("prompt=none", "object of strings"),
])
def test_authorization_params_cannot_override_the_gateway(params, message) -> None:
    with pytest.raises(ValidationError, match=message):
        normalize_app({"name": "g", "provider": "gmail", "clientId": "c", "clientSecret": "s",
                       "authorizationParams": params})


def test_unknown_grant_is_refused() -> None:
    with pytest.raises(ValidationError, match="grant must be one of"):
        normalize_app({"name": "g", "provider": "gmail", "clientId": "c", "clientSecret": "s", "grant": "implicit"})
