"""What the experiment trackers hold, read back the way they store it: W&B's offline run files (RUN_DIR/wandb/) and
an MLflow store through MLflow's own client; and the check that both hold exactly metrics.jsonl's records."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

from tests.helpers import expected_points, same_points

BLOCK = 32768     # W&B's .wandb files are LevelDB-log framed: 32 KiB blocks of checksummed chunks


def wandb_records(path: Path):
    """The protobuf Records of one `run-<id>.wandb` file (W&B's own schema, wandb.proto.wandb_internal_pb2), every
    chunk's CRC checked. wandb >= 0.2x reads these files in its Go core only, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:                  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad chunk checksum"
        pending = chunk if kind in (1, 2) else pending + chunk      # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_dir: Path) -> dict:
    """The W&B offline run RUN_DIR/tracking.json names, as its files say: one offline-run-*-<id> directory per
    session (a resume adds one; W&B appends -1, -2, ... to one that starts in the same second as another)."""
    run_id = json.loads((Path(run_dir) / "tracking.json").read_text())["wandb"]["id"]
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(m.group(1), int(m.group(2) or 0), p) for p in (Path(run_dir) / "wandb").glob("offline-run-*")
             if (m := name.fullmatch(p.name))]
    sessions = [p for *_, p in sorted(found)]
    assert sessions, f"no W&B offline run under {run_dir}/wandb"
    run = {"ids": set(), "history": {}, "config": {}, "files": set(), "exit_codes": [], "group": None, "tags": []}
    for session in sessions:
        for record in wandb_records(next(session.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["ids"].add(record.run.run_id)
                run.update(group=record.run.run_group, tags=list(record.run.tags), project=record.run.project)
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for tag, value in items.items():
                    if not tag.startswith("_"):
                        run["history"].setdefault(tag, []).append((record.history.step.num, value))
            elif kind == "files":
                run["files"] |= {f.path for f in record.files.files if (session / "files" / f.path).exists()}
            elif kind == "exit":
                run["exit_codes"].append(record.exit.exit_code)
        run["last_session"] = session
    return run


def mlflow_run(run_dir: Path) -> tuple:
    """(client, run) of the MLflow run RUN_DIR/tracking.json names, through MLflow's own client."""
    from learners.tracking.mlflow_run import client_for

    state = json.loads((Path(run_dir) / "tracking.json").read_text())["mlflow"]
    client = client_for(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def mlflow_history(client, run) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of an MLflow run, every point MLflow holds (in the order they were logged)."""
    return {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag),
                                                    key=lambda m: (m.step, m.timestamp))]
            for tag in run.data.metrics}


def check_trackers_match_metrics(run_dir: Path, completed: bool = True) -> tuple[dict, tuple]:
    """W&B's offline files and the MLflow store hold every metrics.jsonl record once, at its env steps per agent,
    with its values; the resolved config; and (a completed run) returns.png and summary.json."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    expected = expected_points(run_dir)

    wb = wandb_run(run_dir)
    assert len(wb["ids"]) == 1, f"W&B runs {wb['ids']}: a resume must continue the same run"
    same_points(wb["history"], expected, "W&B")
    assert {k: v for k, v in wb["config"].items() if k in config} == config

    client, run = mlflow_run(run_dir)
    same_points(mlflow_history(client, run), expected, "MLflow")
    from learners.config import RESUME_MAY_CHANGE

    # MLflow params are written once; a resume may change only the fields that do not change what a run computes
    assert set(run.data.params) == set(config)
    assert {k: v for k, v in run.data.params.items() if k not in RESUME_MAY_CHANGE} == \
        {k: str(v) for k, v in config.items() if k not in RESUME_MAY_CHANGE}
    if completed:
        assert {"returns.png", "summary.json", "config.json"} <= wb["files"], wb["files"]
        assert json.loads((wb["last_session"] / "files" / "summary.json").read_text()) == \
            json.loads((run_dir / "summary.json").read_text())
        assert wb["exit_codes"][-1] == 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"returns.png", "summary.json", "config.json"} <= artifacts, artifacts
        assert run.info.status == "FINISHED"
    return wb, (client, run)
