import json

import pytest
import torch

from learners.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                 tensors_from_bytes, tensors_to_bytes)


def blobs(value: float) -> list[bytes]:
    return [tensors_to_bytes({"w": torch.full((3,), value), "step": 4}) for _ in range(2)]


def test_round_trip_and_pruning(tmp_path):
    for it in (2, 4, 6, 8):
        save_checkpoint(tmp_path, it, blobs(it), {"iteration": it}, keep=3)
    assert [p.name for p in sorted(tmp_path.glob("ckpt-*"))] == ["ckpt-000004", "ckpt-000006", "ckpt-000008"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.iteration == 8 and ckpt.state == {"iteration": 8}
    assert torch.equal(tensors_from_bytes(ckpt.learners[1])["w"], torch.full((3,), 8.0))
    assert not list(tmp_path.rglob(".*.tmp"))          # no temp files left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage, caplog):
    save_checkpoint(tmp_path, 1, blobs(1), {"iteration": 1}, keep=5)
    newest = save_checkpoint(tmp_path, 2, blobs(2), {"iteration": 2}, keep=5)
    target = newest / ("manifest.json" if damage == "no-manifest" else "learner-1.pt")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=str(target).replace(".", r"\.")):
        load_checkpoint(newest)
    assert latest_checkpoint(tmp_path).iteration == 1
    assert str(target) in caplog.text


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import io
    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        tensors_from_bytes(buffer.getvalue())


def test_nothing_to_resume(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "ckpt-000003").mkdir()
    (tmp_path / "ckpt-000003" / "manifest.json").write_text(json.dumps({"iteration": 3, "files": {"x": "0"}}))
    assert latest_checkpoint(tmp_path) is None
