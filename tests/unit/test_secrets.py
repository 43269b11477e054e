"""Encryption at rest: the key file and SecretBox round trips."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.auth.secrets import SecretBox, SecretDecryptError, SecretKeyError


def test_from_file_creates_key_0600_and_parent_dir(tmp_path: Path) -> None:
    key_path = tmp_path / "deep" / "dir" / "secret.key"
    box = SecretBox.from_file(key_path)
    assert key_path.exists()
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert box.decrypt(box.encrypt("hello")) == "hello"


def test_from_file_reloads_the_same_key(tmp_path: Path) -> None:
    key_path = tmp_path / "secret.key"
    sealed = SecretBox.from_file(key_path).encrypt("refresh-token-ü")
    assert SecretBox.from_file(key_path).decrypt(sealed) == "refresh-token-ü"


def test_ciphertext_does_not_contain_plaintext_and_is_randomised() -> None:
    box = SecretBox.generate()
    one, two = box.encrypt("hunter2"), box.encrypt("hunter2")
    assert "hunter2" not in one and one != two


def test_none_passes_through() -> None:
    box = SecretBox.generate()
    assert box.encrypt(None) is None and box.decrypt(None) is None


def test_wrong_key_fails_with_clear_error() -> None:
    sealed = SecretBox.generate().encrypt("x")
    with pytest.raises(SecretDecryptError, match="wrong secret key"):
        SecretBox.generate().decrypt(sealed)


def test_corrupt_key_file_is_rejected(tmp_path: Path) -> None:
    key_path = tmp_path / "secret.key"
    key_path.write_text("not a key\n")
    with pytest.raises(SecretKeyError, match="secret.key"):
        SecretBox.from_file(key_path)
