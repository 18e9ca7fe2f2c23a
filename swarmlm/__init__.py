"""swarmlm: serve and train language models on a swarm of ordinary machines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarmlm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
