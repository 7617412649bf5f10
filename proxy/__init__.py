"""databroker: a Redis-cached data broker sidecar for decision engines."""

__version__ = "0.1.0"
