"""gRPC server side of the distillation exchange: a servicer over a learner's PeerEndpoint, and `serve` (with the
standard health service). The client is learners/peer/client.py, the wire format learners/peer/wire.py."""

from __future__ import annotations

from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learners.peer.endpoint import PeerEndpoint
from learners.peer.guard import CallGuard, server_threads
from learners.peer.security import ChannelSecurity, TokenInterceptor
from learners.peer.sync import ProtocolError, SyncError
from learners.peer.wire import CHUNK_BYTES, MAX_MESSAGE_BYTES, SERVICE_NAME, from_ndarray, sync_from, to_ndarray
from protos import distill_pb2 as pb
from protos import distill_pb2_grpc as pb_grpc


class DistillServicer(pb_grpc.DistillServicer):
    def __init__(self, endpoint: PeerEndpoint):
        self.endpoint = endpoint

    def PeerLogits(self, request: pb.LogitsRequest, context) -> Iterator[pb.LogitsChunk]:
        sync = sync_from(request.sync)
        try:
            rows = from_ndarray(request.rows)
            most = max(1, CHUNK_BYTES // (4 * self.endpoint.learner.num_actions))    # float32 logits a message
            per_chunk = min(request.rows_per_chunk, most) if request.rows_per_chunk > 0 else most
            for i, logits in enumerate(self.endpoint.serve_logits(sync, request.frames_digest, rows,
                                                                  request.keep_graph, per_chunk)):
                yield pb.LogitsChunk(chunk_index=i, step=sync.step, logits=to_ndarray(logits))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except SyncError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def PeerGrad(self, request_iterator, context) -> pb.GradAck:
        """Exact mode: the caller's gradients for my logits, a chunk a message, each backpropagated as it comes."""
        chunks, sync = 0, None
        try:
            for msg in request_iterator:
                sync = sync or sync_from(msg.sync)
                if sync_from(msg.sync) != sync:
                    raise ValueError(f"chunk {msg.chunk_index} from another sync")
                grad = from_ndarray(msg.grad)
                if grad.dtype != np.float32 or not np.isfinite(grad).all():
                    raise ValueError("gradients must be finite float32")
                self.endpoint.apply_peer_grad(sync, msg.chunk_index, grad)
                chunks += 1
            if sync is None:
                raise ValueError("empty request stream")
        except (ValueError, ProtocolError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except SyncError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.GradAck(step=sync.step, chunks=chunks)


def serve(endpoint: PeerEndpoint, host: str, port: int, security: ChannelSecurity = ChannelSecurity(),
          interceptors: tuple = ()) -> tuple[grpc.Server, int]:
    """Start a learner's gRPC server (plus the standard health service); returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    # `interceptors` (e.g. telemetry's call counter) run first, so calls the token check or the guard turn away are
    # seen too; then the token, then who the caller is and how many calls it has (learners/peer/guard.py).
    guard = CallGuard(lambda: endpoint.peer_ids)
    interceptors = [*interceptors] + ([TokenInterceptor(security.token)] if security.token else []) + [guard]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(endpoint.cfg.num_learners - 1)),
                         options=options, interceptors=interceptors)
    server.guard = guard
    pb_grpc.add_DistillServicer_to_server(DistillServicer(endpoint), server)
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
        raise OSError(f"learner {endpoint.id}: cannot bind gRPC server to {host}:{port} (port in use?)")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
