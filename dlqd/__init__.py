"""dlqd: the dead-letter-queue daemon for Postgres-backed job systems."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dlqd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
