"""swarmlm: serve and train language models on a swarm of ordinary machines."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# hivemind reads USE_LEGACY_BFLOAT16 at import: with the legacy default it sends bf16 tensors as fp32,
# doubling the bytes of every hidden state on the wire. Every swarmlm module runs this file first, so the
# setting is in place before any of them imports hivemind.
os.environ.setdefault("USE_LEGACY_BFLOAT16", "0")

if TYPE_CHECKING:
    from swarmlm.swarm.client import RemoteModel
    from swarmlm.train.distributed_model import DistributedModel

__all__ = ["DistributedModel", "RemoteModel", "__version__"]


def __getattr__(name: str) -> Any:
    """`from swarmlm import DistributedModel` (or `RemoteModel`) imports torch and hivemind only when it is
    asked for, and `__version__` importlib.metadata (~30 ms): the CLI imports `swarmlm` for every command
    and must stay quick to start."""
    if name == "__version__":
        from swarmlm.core.version import __version__

        return __version__
    if name == "DistributedModel":
        from swarmlm.train.distributed_model import DistributedModel

        return DistributedModel
    if name == "RemoteModel":
        from swarmlm.swarm.client import RemoteModel

        return RemoteModel
    raise AttributeError(f"module 'swarmlm' has no attribute {name!r}")
