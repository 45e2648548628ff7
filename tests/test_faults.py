"""Findings 2 (`reliability-findings-2.md`): hostile input and faults each end in correct behaviour or one
``error:`` line (exit 2), never a silent wrong result or a traceback. Each test names its D-item."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from icf.cli import app


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def test_d3_score_refuses_s4_predictions_saved_as_0_1_masks(tmp_path):
    """0/1 uint8 PNGs scored J 0.30 (as near-zero probabilities) instead of 1.0, silently."""
    root, pred = tmp_path / "Single-source", tmp_path / "pred"
    rng = np.random.default_rng(0)
    rows = ["name,start,category,split"]
    for c in range(2):
        rows.append(f"clip{c},0,helicopter,test")
        for n in range(1, 6):
            gt = (rng.random((6, 8)) < 0.4).astype(np.uint8)
            rel = f"s4_data/gt_masks/test/helicopter/clip{c}/clip{c}_{n}.png"
            _png(root / rel, gt * 255)
            _png(pred / rel, gt)  # a hard mask saved as 0/1
    (root / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")
    args = ["score", "--dataset", "s4", "--root", str(root), "--pred", str(pred)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "only the values 0 and 1" in res.output and "Traceback" not in res.output
    for path in pred.rglob("*.png"):
        _png(path, np.asarray(Image.open(path)) * 255)
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["J"] == pytest.approx(1.0, abs=1e-6)


def test_d18_verify_of_a_workspace_that_was_never_staged_is_one_error_line(tmp_path):
    """It said "avss: 2 files checked, 2 damaged" with exit 1; `icf status` says "no manifest" (exit 2)."""
    res = CliRunner().invoke(app, ["verify", "--dataset", "avss", "--work", str(tmp_path / "nowork")])
    assert res.exit_code == 2 and "error: no manifest for 'avss'" in res.output and "damaged" not in res.output


def test_d22_an_unreachable_ray_address_from_the_environment_names_ray_address_not_a_flag(monkeypatch):
    """``RAY_ADDRESS=127.0.0.1:1 icf stage mel`` blamed a ``--ray-address`` the user never passed."""
    from icf.clitools import UserError
    from icf.pipeline.runners import connect

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match=r"^\$RAY_ADDRESS 127.0.0.1:1: no Ray cluster answers there .*unset RAY_ADDRESS"):
        connect(None)
    with pytest.raises(UserError, match="^--ray-address 127.0.0.1:1: no Ray cluster answers there"):
        connect("127.0.0.1:1")


def test_d15_sigterm_to_a_driver_on_ray_stops_cleanly_with_143(tmp_path):
    """SIGTERM to ``icf stage all`` on Ray exited 134 with Ray's native ``*** SIGTERM received`` dump (its core
    worker's handler); without Ray it is a clean 143. Now both stop cleanly: Ray is shut down, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "driver.py"
    script.write_text(
        "import time, ray\n"
        "from icf.pipeline.runners import connect\n"
        "from icf.workflow.run import ray_session\n"
        "with ray_session():\n"
        "    connect(None)\n"
        "    slow = ray.remote(lambda: time.sleep(120))\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        ray.get(slow.remote())\n"
        "    finally:\n"
        "        print('unwound', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    for line in proc.stdout:  # Ray may log a few lines first
        if line.strip() == "ready":
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert "unwound" in output and "SIGTERM received" not in output


def test_d19_shards_rebuilt_under_a_reader_are_not_called_damaged(tmp_path, avss_shards):
    """Shards rewritten mid-training (``stage shard --force --image-size 48``) stopped the trainer with "rebuild
    the shards with icf stage all", though they were fine: shards.json had changed under the run."""
    from icf.clitools import UserError
    from icf.data.shard_check import read_checked
    from icf.data.shards import ShardSet

    avss_shards(tmp_path, n_train=4, n_val=2, size=32)
    old = ShardSet.load(tmp_path / "avss")
    avss_shards(tmp_path, n_train=4, n_val=2, size=24)  # a rebuild with another image size
    with pytest.raises(UserError, match="shards were rebuilt while this run read them") as info:
        list(read_checked(old.splits["train"][0]))
    assert "icf stage all" not in str(info.value)
    assert len(list(read_checked(ShardSet.load(tmp_path / "avss").splits["train"][0]))) == 4
    tar = Path(_current_entry(tmp_path)["url"])
    tar.write_bytes(tar.read_bytes()[:-1024])  # damaged, shards.json unchanged: the rebuild hint
    with pytest.raises(UserError, match="rebuild the shards with `icf stage all"):
        list(read_checked(_current_entry(tmp_path)))


def _current_entry(work: Path) -> dict:
    import json

    doc = json.loads((work / "avss" / "shards.json").read_text())
    return dict(doc["splits"]["train"][0], url=str(work / "avss" / doc["splits"]["train"][0]["url"]))


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=5", r"model.num_classes is fixed by the dataset \(avss: 71\), got 5"),
    ("model.frames=3", r"model.frames is fixed by the dataset \(avss: 10\), got 3"),
    ("model.image_size=0", "model.image_size must be an integer of at least 16 pixels, got 0"),
    ("model.image_size=7", "at least 16 pixels, got 7"),
])
def test_d14_dataset_fixed_and_size_fields_are_checked_before_training(override, message):
    """``--set model.num_classes=5`` gave an IndexError after 13 s of training, ``model.image_size=0`` a
    RuntimeError; both are one line now, before any work (``icf train`` turns the ValueError into `UserError`)."""
    from icf.config import apply_overrides, preset

    model, train = preset("tiny", "avss")
    with pytest.raises(ValueError, match=message):
        apply_overrides(model, train, [override])
    same = apply_overrides(model, train, ["model.num_classes=71", "model.image_size=16"])[0]  # the dataset's own value
    assert (same.num_classes, same.image_size) == (71, 16)


def test_d20_an_unknown_segmenter_is_named_as_a_segmenter():
    """``--set method.segmenter=nonsense`` said "unknown method 'nonsense'"."""
    from icf import methods
    from icf.config import ModelConfig

    with pytest.raises(ValueError, match=r"^method.segmenter: unknown segmenter 'nonsense'; expected one of \[.*'bidir'"):
        methods.validate(ModelConfig(method="icf", options={"segmenter": "nonsense"}))


class _Payload:
    """Unpickling this runs code (the probe's malicious checkpoint entry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_d21_a_pickle_payload_as_backbone_weights_is_named_as_unreadable_without_escape_codes(tmp_path):
    """A pickle-blocked backbone file was reported as "shards.json: backbone weights …: do not fit resnet18", and
    CLIP/CLAP weight errors carried raw ANSI codes. Now: the file named as unreadable, plain text, nothing run."""
    import timm
    import torch

    from icf.clitools import UserError
    from icf.encoders.spec import read_checkpoint
    from icf.model.backbone import Backbone

    kwargs = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]}
    state = timm.create_model("resnet18", **kwargs).state_dict()
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({**state, "evil": _Payload(marker)}, evil)
    with pytest.raises(UserError) as info:  # a UserError: `build_model` does not prefix it with shards.json
        Backbone("resnet18", str(evil), kwargs)
    message = str(info.value)
    assert message.startswith(f"backbone weights {evil}: cannot be read as a torch checkpoint of tensors")
    assert "do not fit" not in message and "\x1b" not in message
    with pytest.raises(UserError) as info:
        read_checkpoint(evil, "CLIP")
    assert "cannot be read as a torch checkpoint" in str(info.value) and "\x1b" not in str(info.value)
    assert not marker.exists()


def test_d23_a_full_disk_names_the_file_and_promises_no_resume(tmp_path, monkeypatch):
    """Disk-full in ``predict`` / ``compare`` said "No space left on device (… rerun to resume)": no file, and a
    resume ``compare`` lacks. Every atomic write (compare's files, predict's panels, the stages) now names it."""
    import errno

    from icf.clitools import os_error_line
    from icf.pipeline.store import atomic_write

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "compare.png"
    with pytest.raises(OSError) as info:
        atomic_write(target, b"png")
    line = os_error_line(info.value)
    assert line.startswith(f"{target}: No space left on device") and "resume" not in line
    assert list(tmp_path.iterdir()) == []


def _fake_run(folder: Path, dataset: str) -> Path:
    """A run folder holding only ``run.json`` (what compare reads before evaluating anything)."""
    from icf.config import preset, to_dict

    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({**to_dict(*preset("tiny", dataset)), "method": "icf", "preset": "tiny"}))
    return folder


def test_d16_compare_counts_a_run_given_twice_once_and_refuses_runs_of_two_datasets(tmp_path):
    """``compare r2 r2`` counted one run as two seeds (mean ± 0), and ``compare avss-run s4-run`` put AVSS mIoU
    beside S4 J with no dataset anywhere. A run given twice (by any path) now counts once; mixed datasets refuse
    before evaluating; the output names the dataset."""
    from icf.eval.compare import distinct_runs

    avss, s4 = _fake_run(tmp_path / "a", "avss"), _fake_run(tmp_path / "b", "s4")
    assert distinct_runs([avss, tmp_path / "." / "a", s4, avss]) == [avss, s4]
    mixed = CliRunner().invoke(app, ["compare", str(avss), str(s4), "--split", "val"])
    assert mixed.exit_code == 2 and "different datasets" in mixed.output and f"{s4} (s4)" in mixed.output
