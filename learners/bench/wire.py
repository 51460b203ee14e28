"""`mdpo bench`'s wire figures: what one sync costs to serialize and send, with the learners' gRPC options over
loopback and a server that computes nothing, for the messages of protocol v2 (rows in, logits out; exact mode adds
the gradient) beside the frames protocol v1 streamed in their place (the minibatch's frames in 2 MiB messages, logits
back). Both measured in the same run, side by side; the learners' own bytes per sync come from their updates."""

from __future__ import annotations

import statistics
import time
from concurrent import futures

import grpc
import numpy as np

from learners.peer.wire import CHUNK_BYTES, MAX_MESSAGE_BYTES, to_ndarray
from protos import distill_pb2 as pb

OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _server(num_actions: int) -> tuple[grpc.Server, int]:
    """Answers every stream of messages with one message of logits for the rows it names or carries."""
    def answer(requests, context):
        rows = 0
        for raw in requests:
            msg = pb.NDArray.FromString(raw)
            rows += msg.shape[0]
        yield to_ndarray(np.zeros((rows, num_actions), np.float32)).SerializeToString()

    def take(requests, context):      # the gradient's messages, read to the end; an empty answer
        for _ in requests:
            pass
        return b""

    handler = grpc.method_handlers_generic_handler("mdpo.bench.Wire", {
        "Logits": grpc.stream_stream_rpc_method_handler(answer), "Grad": grpc.stream_unary_rpc_method_handler(take)})
    server = grpc.server(futures.ThreadPoolExecutor(2), options=OPTIONS, handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _one_sync(channel: grpc.Channel, messages, grad: bytes | None) -> tuple[float, int]:
    """Seconds and bytes of one sync: build and send `messages()`, take the logits back (and send `grad`)."""
    t0 = time.perf_counter()
    sent = 0

    def counted():
        nonlocal sent
        for msg in messages():
            raw = msg.SerializeToString()
            sent += len(raw)
            yield raw

    received = sum(len(r) for r in channel.stream_stream("/mdpo.bench.Wire/Logits")(counted(), timeout=60))
    if grad is not None:
        channel.stream_unary("/mdpo.bench.Wire/Grad")(iter([grad]), timeout=60)
        sent += len(grad)
    return time.perf_counter() - t0, sent + received


def transport_cost(obs_shape: tuple[int, ...], rows: int, num_actions: int, exact: bool, reps: int = 5) -> dict:
    """Median seconds and bytes of one sync of `rows` states, protocol v2 beside protocol v1's frames."""
    frames = np.random.default_rng(0).integers(0, 256, (rows, *obs_shape), dtype=np.uint8)
    index = np.random.default_rng(1).permutation(rows).astype(np.int32)
    grad = to_ndarray(np.zeros((rows, num_actions), np.float32)).SerializeToString() if exact else None
    per_message = max(1, CHUNK_BYTES // frames[0].nbytes)

    def v1():      # the window's frames, gathered in stream order, in 2 MiB messages
        for start in range(0, rows, per_message):
            yield to_ndarray(frames[index[start:start + per_message]])

    def v2():      # the rows the peer's frames are to be read at
        yield to_ndarray(index)

    server, port = _server(num_actions)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        figures = {}
        for name, messages in (("v2_rows_and_logits", v2), ("v1_frames", v1)):
            _one_sync(channel, messages, grad)                           # warm-up
            runs = [_one_sync(channel, messages, grad) for _ in range(reps)]
            figures[name] = {"seconds": statistics.median(s for s, _ in runs), "bytes": runs[0][1]}
    finally:
        channel.close()
        server.stop(None)
    return {"rows": rows, "exact": exact, "reps": reps, **figures,
            "ratio": figures["v2_rows_and_logits"]["seconds"] / figures["v1_frames"]["seconds"]}
