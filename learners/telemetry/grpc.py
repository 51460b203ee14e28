"""gRPC interceptors that count calls by final status code (and time them on the server side).

Used by the learner process (learners/telemetry/metrics.py: LearnerTelemetry) on its Distill server and on its
clients to the peers, so `mdpo_grpc_{server,client}_handled_total{grpc_service, grpc_method, grpc_code}`
covers both ends of every call: a peer that is down shows up client-side as UNAVAILABLE or
DEADLINE_EXCEEDED, a peer that refuses a sync server-side as FAILED_PRECONDITION.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

Record = Callable[[str, str, grpc.StatusCode, float], None]   # (service, method, code, start time)


def split_method(full_method: str) -> tuple[str, str]:
    """'/mdpo.v2.Distill/PeerLogits' -> ('mdpo.v2.Distill', 'PeerLogits')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _final_code(context, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()   # set by context.abort()/set_code(); None when the handler never set one
    return code if isinstance(code, grpc.StatusCode) else default


def _wrap_unary_response(behavior, record: Callable[[grpc.StatusCode, float], None]):
    def wrapper(request_or_iterator, context):
        t0 = time.perf_counter()
        try:
            response = behavior(request_or_iterator, context)
        except BaseException:
            record(_final_code(context, grpc.StatusCode.UNKNOWN), t0)
            raise
        record(_final_code(context, grpc.StatusCode.OK), t0)
        return response
    return wrapper


def _wrap_stream_response(behavior, record: Callable[[grpc.StatusCode, float], None]):
    def wrapper(request_or_iterator, context):
        t0 = time.perf_counter()
        try:
            yield from behavior(request_or_iterator, context)
        except GeneratorExit:          # the client went away mid-stream
            record(grpc.StatusCode.CANCELLED, t0)
            raise
        except BaseException:
            record(_final_code(context, grpc.StatusCode.UNKNOWN), t0)
            raise
        record(_final_code(context, grpc.StatusCode.OK), t0)
    return wrapper


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Calls `record(service, method, code, t0)` once per finished call, whatever its outcome."""

    def __init__(self, record: Record):
        self.record = record

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)

        def record(code: grpc.StatusCode, t0: float) -> None:
            self.record(service, method, code, t0)

        ser = dict(request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary, record), **ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary, record), **ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream_response(handler.unary_stream, record), **ser)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(handler.stream_stream, record), **ser)


class ClientMetricsInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Calls `record(service, method, code, t0)` when each call made through the channel ends."""

    def __init__(self, record: Record):
        self.record = record

    def _observe(self, details, call):
        service, method = split_method(details.method)
        t0 = time.perf_counter()
        # Every call object (rendezvous or finished outcome) is a grpc.Future: the callback runs at the
        # end of the call, immediately if it already ended.
        call.add_done_callback(lambda c: self.record(service, method, c.code() or grpc.StatusCode.UNKNOWN, t0))
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._observe(client_call_details, continuation(client_call_details, request))

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._observe(client_call_details, continuation(client_call_details, request))

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._observe(client_call_details, continuation(client_call_details, request_iterator))

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._observe(client_call_details, continuation(client_call_details, request_iterator))
