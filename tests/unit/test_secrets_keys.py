"""Key files with several keys (current first): MultiFernet boxes, atomic rewrites, and a box that
follows a rotation done by another process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

import gateway.auth.secrets as secrets_module
from gateway.auth.secrets import (
    SecretBox,
    SecretDecryptError,
    SecretKeyError,
    read_key_file,
    write_key_file,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key_file(path: Path, *keys: bytes) -> Path:
    path.write_bytes(b"".join(k + b"\n" for k in keys))
    path.chmod(0o600)
    return path


def test_old_tokens_decrypt_and_new_ones_use_the_first_key(tmp_path: Path) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    sealed_old = SecretBox(old).encrypt("made-with-old")
    box = SecretBox.from_file(_key_file(tmp_path / "secret.key", new, old))
    assert box.key_count == 2
    assert box.decrypt(sealed_old) == "made-with-old"
    sealed_new = box.encrypt("made-now")
    assert SecretBox(new).decrypt(sealed_new) == "made-now"
    with pytest.raises(SecretDecryptError):
        SecretBox(old).decrypt(sealed_new)
    # rotate(): any key held decrypts, the first one encrypts
    rotated = box.rotate(sealed_old)
    assert rotated != sealed_old and SecretBox(new).decrypt(rotated) == "made-with-old"


def test_one_key_file_works_as_before(tmp_path: Path) -> None:
    """The original format: one key (with or without a final newline); the file is never rewritten."""
    key = Fernet.generate_key()
    for content in (key + b"\n", key, b"\n" + key + b"\n\n"):
        path = tmp_path / "secret.key"
        path.write_bytes(content)
        box = SecretBox.from_file(path)
        assert box.key_count == 1
        assert SecretBox(key).decrypt(box.encrypt("v")) == "v"
        assert box.decrypt(SecretBox(key).encrypt("w")) == "w"
        assert path.read_bytes() == content
    created = SecretBox.from_file(tmp_path / "new" / "secret.key")  # first start: one key, 0600
    assert len((tmp_path / "new" / "secret.key").read_bytes().splitlines()) == 1
    assert created.decrypt(created.encrypt("x")) == "x"


def test_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(Fernet.generate_key() + b"\nnot a key\n")
    with pytest.raises(SecretKeyError, match="secret.key.* line 2 "):
        SecretBox.from_file(path)
    path.write_bytes(b"\n\n")
    with pytest.raises(SecretKeyError, match="does not hold a valid key"):
        SecretBox.from_file(path)


def test_write_key_file_is_atomic_0600_and_keeps_the_order(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "secret.key", Fernet.generate_key())
    keys = [Fernet.generate_key() for _ in range(3)]
    old_inode = os.stat(path).st_ino
    write_key_file(path, keys)
    assert read_key_file(path) == keys
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.stat(path).st_ino != old_inode  # a new file renamed into place, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.key"]  # no temporary file left
    with pytest.raises(SecretKeyError):
        write_key_file(path, [b"junk"])
    assert read_key_file(path) == keys
    with pytest.raises(SecretKeyError, match="cannot read"):
        write_key_file(tmp_path / "absent.key", keys)  # only replaces an existing file
    assert not (tmp_path / "absent.key").exists()


def test_a_loaded_box_follows_a_rotation_of_its_file(tmp_path: Path) -> None:
    """A running gateway's box: a value under a key it does not hold yet makes it re-read the file
    (at once, since the file changed); encryption switches to the new key within a second."""
    old, new = Fernet.generate_key(), Fernet.generate_key()
    path = _key_file(tmp_path / "secret.key", old)
    clock = Clock()
    box = SecretBox.from_file(path, clock=clock)
    write_key_file(path, [new, old])  # what `gateway secrets rotate` does first
    assert box.decrypt(SecretBox(new).encrypt("after rotation")) == "after rotation"
    assert box.key_count == 2
    write_key_file(path, [new])  # --retire
    clock.now += 1.0
    assert SecretBox(new).decrypt(box.encrypt("written later")) == "written later"
    assert box.key_count == 1


def test_encrypt_picks_up_a_new_current_key_at_most_once_a_second(tmp_path: Path) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    path = _key_file(tmp_path / "secret.key", old)
    clock = Clock()
    box = SecretBox.from_file(path, clock=clock)
    write_key_file(path, [new, old])
    clock.now += 0.5
    assert SecretBox(old).decrypt(box.encrypt("a")) == "a"  # not looked at yet
    clock.now += 0.5
    assert SecretBox(new).decrypt(box.encrypt("b")) == "b"


def test_a_wrong_key_rereads_an_unchanged_file_at_most_once_a_second(tmp_path: Path, monkeypatch) -> None:
    path = _key_file(tmp_path / "secret.key", Fernet.generate_key())
    clock = Clock()
    box = SecretBox.from_file(path, clock=clock)
    reads: list[object] = []
    real = secrets_module.read_key_file

    def counting(p: object) -> list[bytes]:
        reads.append(p)
        return real(p)  # type: ignore[arg-type]

    monkeypatch.setattr(secrets_module, "read_key_file", counting)
    foreign = SecretBox.generate().encrypt("not ours")
    for _ in range(50):
        with pytest.raises(SecretDecryptError, match="wrong secret key"):
            box.decrypt(foreign)
    assert reads == []  # loaded just now and unchanged: no re-read
    clock.now += 1.0
    for _ in range(50):
        with pytest.raises(SecretDecryptError):
            box.decrypt(foreign)
    assert len(reads) == 1
    # a changed file is re-read at once, whatever the time
    foreign_key = Fernet.generate_key()
    write_key_file(path, [Fernet.generate_key(), foreign_key])
    assert box.decrypt(SecretBox(foreign_key).encrypt("now ours")) == "now ours"
    assert len(reads) == 2


def test_a_box_keeps_its_keys_when_the_file_becomes_unreadable(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    path = _key_file(tmp_path / "secret.key", key)
    clock = Clock()
    box = SecretBox.from_file(path, clock=clock)
    path.write_bytes(b"garbage\n")
    clock.now += 5
    assert SecretBox(key).decrypt(box.encrypt("still")) == "still"
    with pytest.raises(SecretDecryptError):
        box.decrypt(SecretBox.generate().encrypt("x"))
    assert box.decrypt(SecretBox(key).encrypt("y")) == "y"


def test_boxes_without_a_file_never_touch_the_disk() -> None:
    box = SecretBox([Fernet.generate_key(), Fernet.generate_key()])
    assert box.key_count == 2
    with pytest.raises(SecretDecryptError):
        box.decrypt(SecretBox.generate().encrypt("x"))
    with pytest.raises(SecretKeyError):
        SecretBox([])
