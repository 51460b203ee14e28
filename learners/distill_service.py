"""gRPC plumbing for the distillation exchange: a servicer over a Learner and a client per peer.

Streams keep every message under `MAX_MESSAGE_BYTES`; every call carries a deadline.
"""

from __future__ import annotations

from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learners.learner import Learner, SyncError, SyncPoint
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc

CHUNK_BYTES = 2 << 20                 # payload per streamed message
MAX_MESSAGE_BYTES = 8 << 20           # accepted per message (payload + headers), on both sides
SERVICE_NAME = "mdpo.v1.Distill"
ALLOWED_DTYPES = {"uint8", "float32", "float64", "int64"}


def to_ndarray(array: np.ndarray) -> pb.NDArray:
    array = np.ascontiguousarray(array)
    return pb.NDArray(dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes())


def from_ndarray(msg: pb.NDArray) -> np.ndarray:
    if msg.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {msg.dtype!r} not allowed (one of {sorted(ALLOWED_DTYPES)})")
    dtype = np.dtype(msg.dtype)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(msg.data):
        raise ValueError(f"NDArray of shape {shape} and dtype {msg.dtype} cannot hold {len(msg.data)} bytes")
    return np.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)  # writable: torch needs it


def _sync_from(msg: pb.SyncPoint) -> SyncPoint:
    return SyncPoint(peer_id=msg.peer_id, iteration=msg.iteration, sync_index=msg.sync_index, step=msg.step)


def _sync_msg(sync: SyncPoint) -> pb.SyncPoint:
    return pb.SyncPoint(peer_id=sync.peer_id, iteration=sync.iteration, sync_index=sync.sync_index, step=sync.step)


def chunk_rows(array: np.ndarray) -> int:
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    return max(1, CHUNK_BYTES // row_bytes)


class DistillServicer(pb_grpc.DistillServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    def PeerLogits(self, request_iterator, context) -> Iterator[pb.LogitsChunk]:
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
        sync, keep_graph = _sync_from(first.sync), first.keep_graph

        def arrays():
            for i, msg in enumerate(_chain(first, request_iterator)):
                if msg.chunk_index != i or _sync_from(msg.sync) != sync:
                    raise ValueError(f"chunk {msg.chunk_index} out of order or from another sync (expected {i})")
                yield from_ndarray(msg.obs)

        try:
            for i, logits in enumerate(self.learner.serve_logits(sync, arrays(), keep_graph)):
                yield pb.LogitsChunk(chunk_index=i, step=sync.step, logits=to_ndarray(logits))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except SyncError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def PeerGrad(self, request_iterator, context) -> pb.GradAck:
        grads, sync = [], None
        try:
            for i, msg in enumerate(request_iterator):
                if sync is None:
                    sync = _sync_from(msg.sync)
                if msg.chunk_index != i or _sync_from(msg.sync) != sync:
                    raise ValueError(f"chunk {msg.chunk_index} out of order or from another sync (expected {i})")
                grad = from_ndarray(msg.grad)
                if grad.dtype != np.float32 or not np.isfinite(grad).all():
                    raise ValueError("gradients must be finite float32")
                grads.append(grad)
            if sync is None:
                raise ValueError("empty request stream")
            self.learner.apply_peer_grad(sync, np.concatenate(grads))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except SyncError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.GradAck(step=sync.step, chunks=len(grads))


def _chain(first, rest):
    yield first
    yield from rest


def serve(learner: Learner, host: str, port: int, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Start the learner's gRPC server (plus the standard health service); returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_DistillServicer_to_server(DistillServicer(learner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"learner {learner.id}: cannot bind gRPC server to {host}:{port} (port in use?)")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


class PeerClient:
    """A learner's connection to one peer learner's Distill service."""

    def __init__(self, peer_id: int, my_id: int, address: str, timeout_s: float):
        self.peer_id, self.my_id, self.address, self.timeout_s = peer_id, my_id, address, timeout_s
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.stub = pb_grpc.DistillStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        status = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError(f"peer {self.peer_id} at {self.address} is not serving (status {status})")

    def fetch_logits(self, sync: SyncPoint, obs: np.ndarray, keep_graph: bool) -> tuple[np.ndarray, int, int]:
        rows = chunk_rows(obs)
        starts = range(0, len(obs), rows)
        sent = 0

        def requests():
            nonlocal sent
            for i, start in enumerate(starts):
                msg = pb.ObsChunk(sync=_sync_msg(sync), chunk_index=i, num_chunks=len(starts),
                                  obs=to_ndarray(obs[start:start + rows]), keep_graph=keep_graph)
                sent += msg.ByteSize()
                yield msg

        chunks, received = [], 0
        for reply in self.stub.PeerLogits(requests(), timeout=self.timeout_s):
            received += reply.ByteSize()
            chunks.append(from_ndarray(reply.logits))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32), sent, received

    def send_grad(self, sync: SyncPoint, grad: np.ndarray) -> int:
        grad = grad.astype(np.float32, copy=False)
        rows = chunk_rows(grad)
        msgs = [pb.GradChunk(sync=_sync_msg(sync), chunk_index=i, num_chunks=-(-len(grad) // rows),
                             grad=to_ndarray(grad[start:start + rows]))
                for i, start in enumerate(range(0, len(grad), rows))]
        self.stub.PeerGrad(iter(msgs), timeout=self.timeout_s)
        return sum(m.ByteSize() for m in msgs)

    def close(self) -> None:
        self.channel.close()
