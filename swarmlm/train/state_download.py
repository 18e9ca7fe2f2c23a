"""Downloading a peer's training state straight into our tensors.

hivemind's `load_state_from_peers` gathers the whole state in the averager's process and hands it to ours
through shared memory, and its loop keeps it until its next command: a restarted pipeline peer peaked at
0.53 of the one-process run's memory while it took one. Here our process asks the peer's averager for the
same stream (its `rpc_download_state`, over the P2P replica of our DHT) and writes each tensor into its
place as it arrives (`Sink`, which the `Replica` provides): what is held besides is one tensor's bytes and
values at a time. `make bench-download` measures both ways side by side: the downloader's memory above
what it held, at the peak, as a share of the state's size (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from torch import Tensor

from swarmlm.train.allreduce import RobustAverager

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Where one download's tensors go, in the order the peer sends them."""

    def put(self, index: int, tensor: Tensor) -> None: ...

    def finish(self, count: int) -> bool:
        """All `count` tensors are in: take the state (True) or refuse it."""
        ...


async def download_state(
    p2p: P2P, prefix: str, peer: PeerID, open_sink: Callable[[Mapping[str, object]], Sink | None], timeout: float
) -> bool:
    """Stream `peer`'s state (the averager of run `prefix`) into the sink `open_sink` gives for its metadata
    (None: not the state we want, and nothing is written). `timeout`: the longest wait for the peer to
    answer, then for each next part. False if the peer sent nothing (it shares no state with us), or the
    sink refused the state."""
    stub = RobustAverager.get_stub(p2p, peer, namespace=prefix)
    stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout)
    sink: Sink | None = None
    parts: list[runtime_pb2.Tensor] = []
    index = 0

    async def flush() -> None:
        nonlocal index, parts
        assert sink is not None
        joined, parts = parts, []
        # decoding and copying take a thread: this loop also serves a pipeline stage's requests
        await asyncio.to_thread(lambda: sink.put(index, deserialize_torch_tensor(combine_from_streaming(joined))))
        index += 1

    async for message in aiter_with_timeout(stream, timeout=timeout):
        if message.metadata:
            sink = open_sink(MSGPackSerializer.loads(message.metadata))
            if sink is None:
                return False
        if sink is None:
            raise ValueError("the peer's state began without its metadata")
        if message.tensor_part.dtype and parts:  # a tensor's first part names its type: the last one is whole
            await flush()
        parts.append(message.tensor_part)
    if sink is None:
        return False
    if parts:
        await flush()
    return sink.finish(index)
