"""gRPC plumbing for the distillation exchange: a servicer over a Learner and a client per peer.

Streams keep every message under `MAX_MESSAGE_BYTES`; every call carries a deadline.
"""

from __future__ import annotations

import hmac
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS material and shared token for the learners' channel; all optional (loopback default needs none)."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    mtls: bool = False
    token: str | None = None

    def __repr__(self) -> str:   # never print key material or the token
        return f"ChannelSecurity(tls={self.cert is not None}, mtls={self.mtls}, token={'set' if self.token else 'unset'})"

    @classmethod
    def from_config(cls, cfg, token: str | None = None) -> "ChannelSecurity":
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(cfg.grpc_tls_cert), read(cfg.grpc_tls_key), read(cfg.grpc_tls_ca), cfg.grpc_mtls,
                   token if token is not None else (os.environ.get(cfg.grpc_token_env) or None))

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose `authorization` metadata is not the shared token."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


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


def serve(learner: Learner, host: str, port: int, security: ChannelSecurity = ChannelSecurity(),
          max_workers: int = 8, interceptors: tuple = ()) -> tuple[grpc.Server, int]:
    """Start the learner's gRPC server (plus the standard health service); returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    # `interceptors` (e.g. telemetry's call counter) run first, so calls the token check rejects are seen too.
    interceptors = [*interceptors] + ([TokenInterceptor(security.token)] if security.token else [])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         interceptors=interceptors)
    pb_grpc.add_DistillServicer_to_server(DistillServicer(learner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.cert:
        credentials = grpc.ssl_server_credentials([(security.key, security.cert)],
                                                  root_certificates=security.ca if security.mtls else None,
                                                  require_client_auth=security.mtls)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"learner {learner.id}: cannot bind gRPC server to {host}:{port} (port in use?)")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


class PeerClient:
    """A learner's connection to one peer learner's Distill service."""

    def __init__(self, peer_id: int, my_id: int, address: str, timeout_s: float,
                 security: ChannelSecurity = ChannelSecurity()):
        self.peer_id, self.my_id, self.address, self.timeout_s = peer_id, my_id, address, timeout_s
        self.metadata = security.metadata
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if security.cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=security.ca, private_key=security.key if security.mtls else None,
                certificate_chain=security.cert if security.mtls else None)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DistillStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        status = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s, metadata=self.metadata).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError(f"peer {self.peer_id} at {self.address} is not serving (status {status})")

    def fetch_logits(self, sync: SyncPoint, obs: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     max_rows: int | None = None) -> tuple[np.ndarray, int, int]:
        """The peer's logits on `obs` (any sliceable rows with .shape/.dtype), plus (bytes sent, bytes received).
        `on_chunk` sees each chunk of logits as it arrives, so the caller can use the first rows early; `max_rows`
        caps the rows per message (smaller chunks: the first logits come back sooner)."""
        rows = min(chunk_rows(obs), max_rows or len(obs) or 1)
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
        call = self.stub.PeerLogits(requests(), timeout=self.timeout_s, metadata=self.metadata)
        try:
            for reply in call:
                received += reply.ByteSize()
                chunks.append(from_ndarray(reply.logits))
                if on_chunk is not None:
                    on_chunk(chunks[-1])
        except BaseException:
            call.cancel()        # e.g. on_chunk rejected a chunk: do not leave the stream open
            raise
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32), sent, received

    def send_grad(self, sync: SyncPoint, grad: np.ndarray) -> int:
        grad = grad.astype(np.float32, copy=False)
        rows = chunk_rows(grad)
        msgs = [pb.GradChunk(sync=_sync_msg(sync), chunk_index=i, num_chunks=-(-len(grad) // rows),
                             grad=to_ndarray(grad[start:start + rows]))
                for i, start in enumerate(range(0, len(grad), rows))]
        self.stub.PeerGrad(iter(msgs), timeout=self.timeout_s, metadata=self.metadata)
        return sum(m.ByteSize() for m in msgs)

    def close(self) -> None:
        self.channel.close()
