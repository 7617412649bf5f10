"""Settings from the environment, read by ``proxy.settings`` itself (no pydantic-settings)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.settings import Settings


def test_a_variable_sets_its_field_and_an_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABROKER_REDIS_PREFIX", "from-env:")
    monkeypatch.setenv("DATABROKER_OUTBOX_BATCH_SIZE", "7")
    assert Settings().redis_prefix == "from-env:"
    assert Settings().outbox_batch_size == 7
    assert Settings(redis_prefix="given:").redis_prefix == "given:"


def test_names_are_read_in_any_case_and_unknown_ones_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("databroker_default_timeout", "2.5")
    monkeypatch.setenv("DATABROKER_NO_SUCH_SETTING", "x")
    assert Settings().default_timeout == 2.5


def test_a_bad_value_names_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABROKER_PRUNE_BATCH_SIZE", "0")
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == ("prune_batch_size",)
