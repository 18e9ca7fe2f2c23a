"""swarmlm: serve and train language models on a swarm of ordinary machines."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

# hivemind reads USE_LEGACY_BFLOAT16 at import: with the legacy default it sends bf16 tensors as fp32,
# doubling the bytes of every hidden state on the wire. Every swarmlm module runs this file first, so the
# setting is in place before any of them imports hivemind.
os.environ.setdefault("USE_LEGACY_BFLOAT16", "0")
# hivemind switches torch's tensor sharing between processes (the averager's buffers, each DHT call's
# future) from torch's default, file descriptors, to files in /dev/shm kept by a torch_shm_manager process
# per peer: some 60 MB of memory a peer more, and the files outlive a peer killed with its manager.
# Descriptors close with the process however it ends; each shared tensor holds one open, so the soft limit
# on open files (often 1,024) is raised to the hard one: a stage of 80 layers shares some 3,000 tensors.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
with contextlib.suppress(ImportError, ValueError, OSError):  # no `resource` (Windows), or not allowed
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

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
