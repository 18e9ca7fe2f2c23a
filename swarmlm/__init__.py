"""swarmlm: serve and train language models on a swarm of ordinary machines."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarmlm.train.api import DistributedModel

try:
    __version__ = version("swarmlm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["DistributedModel", "__version__"]


def __getattr__(name: str) -> Any:
    """`from swarmlm import DistributedModel` imports torch and hivemind only when it is asked for: the
    CLI imports `swarmlm` for every command and must stay quick to start."""
    if name == "DistributedModel":
        from swarmlm.train.api import DistributedModel

        return DistributedModel
    raise AttributeError(f"module 'swarmlm' has no attribute {name!r}")
