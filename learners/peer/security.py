"""Channel security of the learners' gRPC exchange: TLS material and a shared token, all optional (the loopback
default needs none)."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from learners.peer.guard import deny


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
                   token if token is not None else channel_token(cfg))

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
        return None if handler is None else deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")


def channel_token(cfg) -> str | None:
    """The learners' shared token: $grpc_token_env, else the contents of grpc_token_file (e.g. the cluster's Ray
    token file), else none. Read where the driver runs and handed to the learners, never stored in the config."""
    token = os.environ.get(cfg.grpc_token_env)
    if not token and cfg.grpc_token_file:
        token = Path(cfg.grpc_token_file).read_text().strip()
    return token or None
