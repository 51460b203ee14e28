"""A learner's gRPC client to one peer learner's Distill service (every call carries a deadline)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from learners.peer.guard import PEER_ID_KEY
from learners.peer.security import ChannelSecurity
from learners.peer.sync import PeerCallError, SyncPoint
from learners.peer.wire import MAX_MESSAGE_BYTES, SERVICE_NAME, from_ndarray, sync_msg, to_ndarray
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc


class PeerClient:
    """A learner's connection to one peer learner's Distill service."""

    def __init__(self, peer_id: int, my_id: int, address: str, timeout_s: float,
                 security: ChannelSecurity = ChannelSecurity(), interceptors: tuple = ()):
        """`interceptors` (grpc client interceptors, e.g. telemetry's call counter) see every Distill call."""
        self.peer_id, self.my_id, self.address, self.timeout_s = peer_id, my_id, address, timeout_s
        self.metadata = [*security.metadata, (PEER_ID_KEY, str(my_id))]
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if security.cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=security.ca, private_key=security.key if security.mtls else None,
                certificate_chain=security.cert if security.mtls else None)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DistillStub(grpc.intercept_channel(self.channel, *interceptors) if interceptors
                                        else self.channel)

    @contextlib.contextmanager
    def _call(self, method: str):
        """gRPC errors leave as PeerCallError (picklable, typed by status code)."""
        t0 = time.perf_counter()
        try:
            yield
        except grpc.RpcError as err:
            raise PeerCallError.from_rpc(self.peer_id, method, err, time.perf_counter() - t0) from None

    def wait_ready(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise PeerCallError(self.peer_id, "connect", "UNAVAILABLE", f"no connection to {self.address}",
                                timeout_s) from None
        with self._call("Health.Check"):
            status = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s, metadata=self.metadata).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise ConnectionError(f"peer {self.peer_id} at {self.address} is not serving (status {status})")

    def fetch_logits(self, sync: SyncPoint, frames_digest: str, rows: np.ndarray, keep_graph: bool,
                     on_chunk: Callable[[np.ndarray], None] | None = None,
                     rows_per_chunk: int | None = None) -> tuple[np.ndarray, int, int]:
        """The peer's logits on rows `rows` of my batch of `sync.iteration` (frames `frames_digest`, which the peer
        holds), plus (bytes sent, bytes received). `on_chunk` sees each chunk of logits as it arrives, so the caller
        can use the first rows early; `rows_per_chunk` caps the rows per reply (smaller: the first come sooner)."""
        request = pb.LogitsRequest(sync=sync_msg(sync), frames_digest=frames_digest,
                                   rows=to_ndarray(np.asarray(rows, np.int32)), keep_graph=keep_graph,
                                   rows_per_chunk=rows_per_chunk or 0)
        chunks, received = [], 0
        with self._call("PeerLogits"):
            call = self.stub.PeerLogits(request, timeout=self.timeout_s, metadata=self.metadata)
            try:
                for reply in call:
                    received += reply.ByteSize()
                    chunks.append(from_ndarray(reply.logits))
                    if on_chunk is not None:
                        on_chunk(chunks[-1])
            except BaseException:
                call.cancel()        # e.g. on_chunk rejected a chunk: do not leave the stream open
                raise
        return (np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)), request.ByteSize(), received

    def send_grads(self, sync: SyncPoint, chunks: Iterable[tuple[int, np.ndarray]]) -> int:
        """Exact mode: d(my loss)/d(the peer's logits), one message per chunk of its logits as `chunks` yields them,
        on one stream; returns bytes sent."""
        sent = 0

        def messages():
            nonlocal sent
            for chunk, grad in chunks:
                msg = pb.GradChunk(sync=sync_msg(sync), chunk_index=chunk,
                                   grad=to_ndarray(np.asarray(grad, np.float32)))
                sent += msg.ByteSize()
                yield msg

        with self._call("PeerGrad"):
            self.stub.PeerGrad(messages(), timeout=self.timeout_s, metadata=self.metadata)
        return sent

    def close(self) -> None:
        self.channel.close()
