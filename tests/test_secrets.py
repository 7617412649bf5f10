"""proxy.secrets: Fernet at rest, rotation by key list, key loading rules."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from proxy.secrets import SecretBox, SecretKeyError, load_secret_box
from proxy.settings import Settings


def key() -> str:
    return Fernet.generate_key().decode()


@pytest.mark.parametrize("value", ["s3cr3t", 42, 1.5, True, None])
def test_round_trip_keeps_json_type(value: object) -> None:
    box = SecretBox([key()])
    token = box.encrypt(value)
    assert "s3cr3t" not in token
    assert box.decrypt(token) == value


def test_rotation_new_key_first_reads_old_values_and_rotate_moves_them() -> None:
    old, new = key(), key()
    token = SecretBox([old]).encrypt("bureau-password")
    both = SecretBox([new, old])
    assert both.decrypt(token) == "bureau-password"
    rotated = both.rotate(token)
    assert SecretBox([new]).decrypt(rotated) == "bureau-password"
    with pytest.raises(SecretKeyError):
        SecretBox([new]).decrypt(token)


def test_malformed_key_fails_loudly_naming_the_setting() -> None:
    with pytest.raises(SecretKeyError, match="DATABROKER_SECRET_KEY"):
        SecretBox(["not-a-fernet-key"])


def test_settings_key_list_is_comma_separated(tmp_path: Path) -> None:
    old, new = key(), key()
    token = SecretBox([old]).encrypt("v")
    box = load_secret_box(Settings(secret_key=f"{new}, {old}", data_dir=tmp_path))
    assert box.decrypt(token) == "v"


def test_embedded_default_generates_a_private_key_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    token = load_secret_box(settings).encrypt("v")
    key_file = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_secret_box(settings).decrypt(token) == "v"


def test_a_real_database_requires_a_key(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql+asyncpg://x@127.0.0.1/x", data_dir=tmp_path)
    with pytest.raises(SecretKeyError, match="DATABROKER_SECRET_KEY is required"):
        load_secret_box(settings)
    assert not (tmp_path / "secret.key").exists()
