"""Run checkpoints: one directory per checkpoint, written atomically, verified by sha256 on load.

    checkpoints/ckpt-000010/learner-0.pt ... state.json manifest.json

`manifest.json` is written last (temp file, fsync, rename) and lists every file's checksum, so a
checkpoint without a valid manifest is incomplete and is skipped in favour of the previous one.
Learner files are loaded with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from learners.files import atomic_write

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted; the message names it."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def tensors_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


@dataclass
class Checkpoint:
    path: Path
    iteration: int
    learners: list[bytes]       # torch-serialised learner states
    state: dict                 # coordinator state (JSON)


def save_checkpoint(root: Path, iteration: int, learners: list[bytes], state: dict, keep: int) -> Path:
    ckpt = root / f"ckpt-{iteration:06d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    files = {f"learner-{i}.pt": data for i, data in enumerate(learners)}
    files["state.json"] = json.dumps(state).encode()
    for name, data in files.items():
        atomic_write(ckpt / name, data)
    manifest = {"iteration": iteration, "files": {name: sha256(data) for name, data in files.items()}}
    atomic_write(ckpt / "manifest.json", json.dumps(manifest, indent=1).encode())
    for old in sorted(root.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_checkpoint(ckpt: Path) -> Checkpoint:
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: missing or unreadable manifest ({err}); the checkpoint is incomplete") from None
    blobs = {}
    for name, digest in manifest["files"].items():
        path = ckpt / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read ({err})") from None
        if sha256(data) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted file)")
        blobs[name] = data
    learners = [blobs[f"learner-{i}.pt"] for i in range(len(blobs) - 1)]
    return Checkpoint(ckpt, int(manifest["iteration"]), learners, json.loads(blobs["state.json"]))


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for ckpt in sorted(root.glob("ckpt-*"), reverse=True):
        try:
            return load_checkpoint(ckpt)
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
    return None
