"""Robust decentralized all-reduce on hivemind: every group member ends with bit-identical results.

hivemind's `DecentralizedAverager` splits the vector into parts, one reducer per part (butterfly
all-reduce over its P2P streams, groups formed by matchmaking through the DHT). We change three things:

1. **Each reducer applies an aggregation rule to its part** (`aggregation.py`: mean, trimmed mean,
   CenteredClip) instead of a running weighted sum: it keeps its part's contributions and aggregates when
   all senders are in (the BTARD approach).
2. **Reducers send the aggregate itself, rounded through the wire format once**, where hivemind sends
   each sender the difference from its own part. With differences, every member ends with a slightly
   different result (`local + fp16(avg - local)`), so peers' global weights would drift apart. Here all
   members, the reducer included, receive the same fp16 (or fp32, int8) values, so after a DiLoCo outer step
   every peer's weights have the same digest.
3. **The result counts only when every part arrived.** Each part's result is written into the averaged
   tensors as it arrives (hivemind keeps every part until the end, then concatenates them: a second copy
   of the vector, most of what an averager held in a round). If a reducer died mid-way, hivemind fills
   its parts with the local values and reports success, which again splits the peers' states; we raise
   instead, leaving the tensors partly averaged: the caller writes its update into them again before it
   retries with whoever is left (`SwarmLink.average`'s `refill`).

Bytes sent over the wire (parts to reducers and aggregates back) are counted for the training
benchmark in a counter shared with the averager's process.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
from collections.abc import Callable, Mapping, Sequence
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind's servicer recognises typing's alias, not collections.abc's

import numpy as np
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialization,
    serialize_torch_tensor,
)
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import amap_in_executor, get_dht_time
from hivemind.utils.mpfuture import MPFuture
from torch import Tensor

from swarmlm.core import process_guard
from swarmlm.core.membership import Membership
from swarmlm.train.aggregation import Aggregator, get_aggregator
from swarmlm.train.train_config import WIRE_FORMATS


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's uniform 8-bit codec (256 buckets over the mean +- 3 std, each decoded as the mean of
    its values) with a decoder that runs on numpy >= 2.4: hivemind 1.1.12 calls int() on a one-element
    array, which numpy 2.4 refuses. The bytes are hivemind's, so its peers decode ours and we theirs."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> Tensor:
        buffer = serialized_tensor.buffer
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=size, dtype=self.codebook_dtype)
        indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        values = torch.as_tensor(codebook).to(getattr(torch, serialized_tensor.dtype))
        quantized = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        return values[quantized].requires_grad_(serialized_tensor.requires_grad)


# hivemind decodes by the wire type named in each message: register the working decoder for it.
serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()

# int8 as INTELLECT-1 sends its pseudo-gradients: a quarter of fp32's bytes.
WIRE_CODECS: dict[str, CompressionBase] = dict(
    zip(WIRE_FORMATS, (Float16Compression(), NoCompression(), Uniform8Bit()), strict=True)
)


class _Contributions:
    """Stands in for `TensorPartReducer.accumulator`: keeps each sender's part instead of summing."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: Tensor, alpha: float = 1.0) -> None:
        self.parts.append(part.float())
        self.weights.append(alpha)


class _ResultsInPlace(TensorPartContainer):
    """Writes each part's result into the local tensor it belongs to as it arrives (point 3). Our own part
    has been sent by then: a reducer aggregates part i once every sender's part i is in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Views into the averaged tensors, by peer and part (hivemind clears its queues when it finishes).
        self._targets = [tuple(part for part, _ in parts) for parts in self._input_parts_by_peer]

    def register_processed_part(self, peer_index: int, part_index: int, part: Tensor) -> None:
        if self.finished.is_set():  # failed or cancelled: the tensors may be refilled by now
            return
        if part_index != self._outputs_registered_by_peer[peer_index]:
            raise ValueError(f"part {part_index} from peer {peer_index} arrived out of order")
        target = self._targets[peer_index][part_index]
        if part.data_ptr() != target.data_ptr():  # a failed reducer's parts are our own values
            target.copy_(part)
        self._outputs_registered_by_peer[peer_index] += 1
        self._output_part_available[peer_index].set()

    async def iterate_output_tensors(self) -> AsyncIterator[Tensor]:
        """The averaged tensors themselves, once every part's result is written into them."""
        self._outputs_consumed = True
        for peer_index in range(self.group_size):
            while self._outputs_registered_by_peer[peer_index] < self.num_parts_by_peer[peer_index]:
                self._output_part_available[peer_index].clear()
                await self._output_part_available[peer_index].wait()
                if self.finished.is_set():
                    raise AllreduceException("the all-reduce was terminated while its results arrived")
        for tensor in self.local_tensors:
            yield tensor


class RobustPartReducer(TensorPartReducer):
    """Aggregates one part at a time with `rule` once all live senders contributed it."""

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        rule: Aggregator,
        wire: CompressionBase,
        remote_senders: int,
    ):
        self.rule, self.wire = rule, wire
        # Each aggregate as sent: re-encoding a decoded int8 part gives other bytes (a new codebook), so
        # every member, this reducer included, decodes this one message. Kept until every remote sender
        # took it (`take_message`), not to the end: the whole vector's messages would pile up.
        self.messages: dict[int, runtime_pb2.Tensor] = {}
        self._takers, self._taken = remote_senders, dict[int, int]()
        super().__init__(part_shapes, num_senders)

    def take_message(self, part_index: int) -> runtime_pb2.Tensor:
        self._taken[part_index] = taken = self._taken.get(part_index, 0) + 1
        return self.messages.pop(part_index) if taken >= self._takers else self.messages[part_index]

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _Contributions()

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            acc: _Contributions = self.accumulator
            result = self.rule(torch.stack(acc.parts), torch.tensor(acc.weights))
            message = serialize_torch_tensor(result, self.wire.compression_type)
            self.messages[self.current_part_index] = message
            rounded = deserialize_torch_tensor(message)
            self.current_part_future.set_result(rounded.reshape(self.part_shapes[self.current_part_index]))
            self.reset_accumulators()


class RobustAllReduceRunner(AllReduceRunner):
    def __init__(
        self,
        *,
        rule: Aggregator,
        bytes_sent: Any,
        tensors: Sequence[Tensor],
        peer_fractions: tuple[float, ...],
        compression: CompressionBase,
        **kwargs: Any,
    ) -> None:
        super().__init__(tensors=tensors, peer_fractions=peer_fractions, compression=compression, **kwargs)
        self.tensor_part_reducer.finished.set()  # hivemind's reducer is replaced below, before it saw any part
        part_size = kwargs.get("part_size_bytes")
        extra = {"part_size_bytes": part_size} if part_size else {}
        # Absolute results, not differences from our own part (point 2 of the module docstring).
        self.tensor_part_container = _ResultsInPlace(
            tensors,
            peer_fractions,
            compression=compression,
            return_deltas=False,
            tensor_infos=kwargs.get("tensor_infos"),
            **extra,
        )
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(
            self.ordered_peer_ids.index(self.peer_id)
        )
        self.tensor_part_reducer = RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            rule,
            compression,
            remote_senders=len(self.sender_peer_ids) - (self.peer_id in self.sender_peer_ids),
        )
        self.bytes_sent = bytes_sent

    def _count(self, message: averaging_pb2.AveragingData) -> averaging_pb2.AveragingData:
        with self.bytes_sent.get_lock():
            self.bytes_sent.value += message.ByteSize()
        return message

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        if peer_id != self.peer_id:  # remote reducer: hivemind's code registers whatever it sends back
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, part in enumerate(self.parts_for_local_averaging):
            result = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
            self.tensor_part_container.register_processed_part(peer_index, part_index, result)

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            yield self._count(message)

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Reducer side: aggregate each incoming part, answer with the aggregate itself."""
        received = 0
        try:
            async for part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                await self.tensor_part_reducer.accumulate_part(sender_index, received, part, weight=weight)
                message = self.tensor_part_reducer.take_message(received)
                received += 1
                yield self._count(averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=message))
        finally:
            if received != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class RobustAverager(DecentralizedAverager):
    """A `DecentralizedAverager` whose all-reduce is robust, bit-identical across members, and fails whole.

    `state_fn` returns (metadata, tensors) that a newcomer downloads with `load_state_from_peers`.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dht: DHT,
        *,
        aggregation: str = "mean",
        wire: str = "fp16",
        state_fn: Callable[[], tuple[Mapping[str, object], Sequence[Tensor]]] | None = None,
        membership: Membership | None = None,
        **kwargs: Any,
    ) -> None:
        if wire not in WIRE_CODECS:
            raise ValueError(f"wire format must be one of {', '.join(WIRE_CODECS)}, not {wire!r}")
        self.rule = get_aggregator(aggregation)
        process_guard.install()  # the averager is a fork of ours: it must die with us, even on SIGKILL
        self.bytes_sent = mp.Value(ctypes.c_int64, 0)  # shared with the averager's process (fork)
        self._state_fn = state_fn
        self.membership = membership  # private swarm: only members may join our groups or download state
        super().__init__(tensors, dht, compression=WIRE_CODECS[wire], **kwargs)

    def set_min_group_size(self, size: int) -> None:
        """The fewest members a group may start with, from now on (hivemind fixes it at construction)."""
        future = MPFuture()
        self._outer_pipe.send(("_set_min_group_size", [], dict(size=size, future=future)))
        future.result()

    async def _set_min_group_size(self, size: int, future: MPFuture) -> None:
        self._matchmaking.min_group_size = size
        future.set_result(None)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        if group_info.peer_ids == (self.peer_id,):  # alone: the aggregate of our contribution is itself
            self._running_groups[group_id].cancel()  # (no runner for others to find)
            self.last_updated = get_dht_time()
            self._state_updated.set()
            return
        runner = RobustAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            rule=self.rule,
            bytes_sent=self.bytes_sent,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers receive no results")
            return
        async for _ in runner:  # each part's result is written into `tensors` as it arrives (point 3)
            pass
        if runner.tensor_part_container.failed_size:
            raise AllreduceException("a reducer failed mid-way: the round is retried with the peers left")
        self.last_updated = get_dht_time()
        self._state_updated.set()

    async def _members_only(self, context: P2PContext, replies: AsyncIterator[Any], refusal: Any) -> AsyncIterator[Any]:
        """`replies` (a handler of hivemind's, not started yet) for a member; `refusal` (if any) for others."""
        if self.membership is not None and not await self.membership.admits(str(context.remote_id)):
            if refusal is not None:
                yield refusal
            return
        async for reply in replies:
            yield reply

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        refusal = averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        async for reply in self._members_only(context, super().rpc_join_group(request, context), refusal):
            yield reply

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        refusal = averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        async for reply in self._members_only(context, super().rpc_aggregate_part(stream, context), refusal):
            yield reply

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        # No refusal message: an empty answer sends the downloader on to the next peer.
        async for reply in self._members_only(context, super().rpc_download_state(request, context), None):
            yield reply

    def get_current_state(self) -> tuple[Any, Sequence[Tensor], Sequence[CompressionInfo] | None]:
        if self._state_fn is None:
            return super().get_current_state()
        metadata, tensors = self._state_fn()
        return metadata, tensors, None
