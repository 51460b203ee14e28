"""The wire format of the peer exchange (protos/distill.proto): tensors as NDArray {dtype, shape, bytes}, sync
points, and message sizes. Only logits, their gradients and row indices travel; streams keep every message under
MAX_MESSAGE_BYTES."""

from __future__ import annotations

import numpy as np

from learners.peer.sync import SyncPoint
from protos import distill_pb2 as pb

CHUNK_BYTES = 2 << 20                 # payload per streamed message
MAX_MESSAGE_BYTES = 8 << 20           # accepted per message (payload + headers), on both sides
SERVICE_NAME = "mdpo.v2.Distill"
ALLOWED_DTYPES = {"float32", "int32"}     # logits and their gradients; row indices


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


def sync_from(msg: pb.SyncPoint) -> SyncPoint:
    return SyncPoint(peer_id=msg.peer_id, iteration=msg.iteration, sync_index=msg.sync_index, step=msg.step)


def sync_msg(sync: SyncPoint) -> pb.SyncPoint:
    return pb.SyncPoint(peer_id=sync.peer_id, iteration=sync.iteration, sync_index=sync.sync_index, step=sync.step)
