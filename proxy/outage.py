"""Logging a dependency's outage once, not once per failure.

At full load a line per failed request (or per failed flush) would be an outage
of its own: the log says when a dependency went away, and when it came back.
"""

from __future__ import annotations

import logging


class Outage:
    """One line when ``failed`` is first called, one when ``recovered`` follows it."""

    def __init__(self, logger: logging.Logger, lost: str, back: str) -> None:
        """``lost`` has one ``%s``, for the kind of failure (a name, never a message that
        could quote a secret)."""
        self._logger = logger
        self._lost = lost
        self._back = back
        self.down = False

    def failed(self, kind: str) -> None:
        if not self.down:
            self.down = True
            self._logger.warning(self._lost, kind)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self._logger.warning(self._back)
