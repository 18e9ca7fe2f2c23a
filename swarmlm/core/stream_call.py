"""One request and its one reply on a fresh P2P stream of a handler.

Used instead of hivemind's unary calls where a message can be large (activations of a training batch):
a unary message is limited to about 2 MiB, a stream's messages are not.
"""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2


class StreamCallError(RuntimeError):
    """The peer closed the stream, or answered with hivemind's error marker."""


async def request_reply(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: runtime_pb2.ExpertRequest
) -> runtime_pb2.ExpertResponse:
    """Send `request` on an opened stream, read the reply, close the stream."""
    try:
        await P2P.send_protobuf(request, writer)
        msg, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
        if err is not None or msg is None:
            raise StreamCallError(err.message if err is not None else "no reply")
        return msg
    finally:
        writer.close()
