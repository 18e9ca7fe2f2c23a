"""The installed package's version: announced in peer records and ledger entries, printed by --version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarmlm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
