"""proxy.outage: one line when a dependency goes away, one when it is back."""

from __future__ import annotations

import logging

import pytest

from proxy.outage import Outage

logger = logging.getLogger("databroker.test-outage")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger.name]


def test_an_outage_is_logged_once_and_so_is_its_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    outage = Outage(logger, "thing lost (%s)", "thing back")
    outage.recovered()  # nothing was lost: nothing to say
    for _ in range(3):
        outage.failed("ConnectionError")
    assert outage.down
    outage.recovered()
    outage.recovered()
    outage.failed("TimeoutError")
    assert lines(caplog) == [
        "thing lost (ConnectionError)",
        "thing back",
        "thing lost (TimeoutError)",
    ]
