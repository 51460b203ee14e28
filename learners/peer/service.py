"""gRPC server side of the distillation exchange: a servicer over a Learner, and `serve` (with the standard health
service). The client is learners/peer/client.py, the wire format learners/peer/wire.py."""

from __future__ import annotations

from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learners.learner import Learner
from learners.peer.guard import CallGuard, server_threads
from learners.peer.security import ChannelSecurity, TokenInterceptor
from learners.peer.sync import ProtocolError, SyncError
from learners.peer.wire import MAX_MESSAGE_BYTES, SERVICE_NAME, from_ndarray, sync_from, to_ndarray
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc


class DistillServicer(pb_grpc.DistillServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    def PeerLogits(self, request_iterator, context) -> Iterator[pb.LogitsChunk]:
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
        sync, keep_graph = sync_from(first.sync), first.keep_graph

        def arrays():
            for i, msg in enumerate(_chain(first, request_iterator)):
                if msg.chunk_index != i or sync_from(msg.sync) != sync:
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
                    sync = sync_from(msg.sync)
                if msg.chunk_index != i or sync_from(msg.sync) != sync:
                    raise ValueError(f"chunk {msg.chunk_index} out of order or from another sync (expected {i})")
                grad = from_ndarray(msg.grad)
                if grad.dtype != np.float32 or not np.isfinite(grad).all():
                    raise ValueError("gradients must be finite float32")
                grads.append(grad)
            if sync is None:
                raise ValueError("empty request stream")
            self.learner.apply_peer_grad(sync, np.concatenate(grads))
        except (ValueError, ProtocolError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except SyncError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.GradAck(step=sync.step, chunks=len(grads))


def _chain(first, rest):
    yield first
    yield from rest


def serve(learner: Learner, host: str, port: int, security: ChannelSecurity = ChannelSecurity(),
          interceptors: tuple = ()) -> tuple[grpc.Server, int]:
    """Start the learner's gRPC server (plus the standard health service); returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    # `interceptors` (e.g. telemetry's call counter) run first, so calls the token check or the guard turn away are
    # seen too; then the token, then who the caller is and how many calls it has (learners/peer/guard.py).
    guard = CallGuard(lambda: learner.peer_state.peer_ids)
    interceptors = [*interceptors] + ([TokenInterceptor(security.token)] if security.token else []) + [guard]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(learner.cfg.num_learners - 1)),
                         options=options, interceptors=interceptors)
    server.guard = guard
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
