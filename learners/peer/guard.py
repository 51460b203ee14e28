"""Who may use a learner's gRPC server, and how much of it.

The server's threads are few, a logits request holds one while its reply streams, and a gradient's request stream
that never sends holds one. So, before any work: a Distill call must name a configured peer of this learner
(metadata `x-mdpo-peer-id`; with a token set, the token check runs first), each peer has at most CALLS_PER_PEER calls
in flight, and a request stream whose first message does not arrive within FIRST_MESSAGE_S is cancelled. Health checks (unary, cheap) stay open to all, for orchestrators' probes.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from typing import Callable

import grpc

PEER_ID_KEY = "x-mdpo-peer-id"
# A peer has one logits request in flight per sync, plus its gradient (exact mode) and a call closing meanwhile.
CALLS_PER_PEER = 4
# A peer sends its first chunk as soon as the stream opens; a stream silent this long is a stranger or a dead peer.
FIRST_MESSAGE_S = 10.0


def server_threads(num_peers: int) -> int:
    """Threads the server needs: every peer's share, and room for health checks and calls being turned away."""
    return CALLS_PER_PEER * max(1, num_peers) + 4


def deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `code` at once, reading nothing."""
    def refuse(request, context):
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class FirstMessageDeadline:
    """A request stream whose call is cancelled unless its first message arrives within `seconds`."""

    def __init__(self, requests, context, seconds: float):
        self.requests, self.timer = requests, threading.Timer(seconds, context.cancel)
        self.timer.daemon = True
        self.timer.start()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.requests)
        finally:
            self.timer.cancel()


class CallGuard(grpc.ServerInterceptor):
    def __init__(self, peer_ids: Callable[[], set[int]], calls_per_peer: int | None = None,
                 first_message_s: float | None = None):
        self.peer_ids = peer_ids
        self.calls_per_peer = CALLS_PER_PEER if calls_per_peer is None else calls_per_peer
        self.first_message_s = FIRST_MESSAGE_S if first_message_s is None else first_message_s
        self.in_flight: Counter[int] = Counter()
        self.refused: Counter[str] = Counter()       # reason -> calls turned away (tests, logs)
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health."):
            return handler
        given = dict(handler_call_details.invocation_metadata).get(PEER_ID_KEY, "")
        peer = int(given) if given.isdigit() else None
        if peer not in self.peer_ids():
            self.refused["not a peer"] += 1
            return deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                        f"caller is not a configured peer of this learner ({PEER_ID_KEY}: {given!r})")
        return self._limited(handler, peer)

    def _limited(self, handler: grpc.RpcMethodHandler, peer: int) -> grpc.RpcMethodHandler:
        """`handler` with peer `peer`'s call count held while it runs, and a deadline on its first message."""
        def enter(context) -> bool:
            with self._lock:
                if self.in_flight[peer] >= self.calls_per_peer:
                    self.refused["over the per-peer limit"] += 1
                    return False
                self.in_flight[peer] += 1
                return True

        def leave() -> None:
            with self._lock:
                self.in_flight[peer] -= 1

        busy = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"peer {peer} has {self.calls_per_peer} calls in flight already")
        if handler.request_streaming and handler.response_streaming:
            @functools.wraps(handler.stream_stream)
            def stream_stream(requests, context):
                if not enter(context):
                    context.abort(*busy)
                try:
                    yield from handler.stream_stream(FirstMessageDeadline(requests, context, self.first_message_s),
                                                     context)
                finally:
                    leave()
            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.request_streaming:
            def stream_unary(requests, context):
                if not enter(context):
                    context.abort(*busy)
                try:
                    return handler.stream_unary(FirstMessageDeadline(requests, context, self.first_message_s), context)
                finally:
                    leave()
            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.response_streaming:     # a logits request: one message in, the logits streamed back
            def unary_stream(request, context):
                if not enter(context):
                    context.abort(*busy)
                try:
                    yield from handler.unary_stream(request, context)
                finally:
                    leave()
            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler      # unary calls hold a thread only while they compute
