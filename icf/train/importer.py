"""``icf import``: a checkpoint released by a method's authors → an icf run folder that ``icf eval``, ``predict``,
``compare``, negatives and robustness read like a trained run.

The method says how to read the file (`icf.methods.base.MethodSpec.import_official`: a key table and the options
the file implies). The run's configs are built as ``icf train`` builds them (project preset → method preset →
the file's options → ``--audio-weights`` → ``--set``), the model is built on the user's staged shards
(``WORK/<dataset>/shards.json``, which ``run.json`` names, so the run evaluates there), the file's tensors are
mapped onto the model's own state — every key, every shape, or a one-line refusal naming the first that does not
fit — and written as a weights-only ``checkpoint.pt`` (`icf.train.checkpoint.save_weights`). ``run.json`` records
where the weights came from: ``imported = {"from": file name, "sha256": …, "format": …}``. The file is read as every weights file is
(`icf.encoders.spec.read_checkpoint`: ``torch.load(weights_only=True)``, so no object in it is ever unpickled; a raw
state dict, ``{"state_dict": …}``, DataParallel's ``module.`` prefixes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import typer

from icf import methods
from icf.clitools import UserError, WorkOption, check_dataset, console, dataset_option, ensure_writable, user_errors, work_dir
from icf.data.shards import ShardSet
from icf.encoders.spec import read_checkpoint
from icf.train import checkpoint
from icf.train.run import RUN_FILE, RunSpec, build_model, shards_path, write_run_file

BACKBONE_PRESETS = {"resnet50": "paper-r50", "pvt_v2_b5": "paper-pvt"}  # --backbone → the project preset


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pick_preset(backbone: str | None, preset: str | None) -> str:
    """The project preset of ``--backbone`` / ``--preset`` (one of them; both must agree)."""
    if backbone is not None and backbone not in BACKBONE_PRESETS:
        raise UserError(f"--backbone must be one of {', '.join(BACKBONE_PRESETS)}, got {backbone!r}")
    if backbone is None and preset is None:
        raise UserError(f"give --backbone ({' | '.join(BACKBONE_PRESETS)}), the one the checkpoint was trained with")
    if backbone is not None and preset is not None and BACKBONE_PRESETS[backbone] != preset:
        raise UserError(f"--backbone {backbone} is preset {BACKBONE_PRESETS[backbone]}, not --preset {preset}")
    return preset or BACKBONE_PRESETS[backbone]  # type: ignore[index]


def toml_value(value: Any) -> str:
    """A value as a ``--set`` right-hand side (JSON numbers, strings and lists are TOML literals)."""
    return json.dumps(value)


def import_official(method: str, dataset: str, source: Path, preset_name: str, work: Path, out: Path,
                    audio_weights: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Write run folder ``out`` from the released checkpoint ``source`` (module docstring); returns a summary
    (``tensors``, ``dropped``, ``run``). `UserError` (one line) for every refusal, before anything is written."""
    from icf.train.trainer import build_configs

    check_dataset(dataset)
    try:
        spec = methods.get(method)
    except ValueError as err:
        raise UserError(str(err)) from None
    fmt = spec.import_official
    if fmt is None:
        able = sorted(m.name for m in methods.registry().values() if m.import_official is not None)
        raise UserError(f"method {method} cannot import released checkpoints (methods that can: {', '.join(able)})")
    if (out / RUN_FILE).exists():
        raise UserError(f"--out {out}: already a run folder ({RUN_FILE} exists); choose another --out")
    state = read_checkpoint(source, f"{method} checkpoint")
    sets = [f"method.{k}={toml_value(v)}" for k, v in fmt.options(state).items()]
    if audio_weights is not None:
        if not audio_weights.is_file():
            raise UserError(f"--audio-weights {audio_weights}: file does not exist")
        sets.append(f"model.audio_weights={toml_value(str(audio_weights.resolve()))}")
    run_spec = RunSpec(dataset=dataset, preset=preset_name, work=work, out=out, method=method,
                       overrides=[*sets, *(overrides or [])])
    model_cfg, train_cfg = build_configs(run_spec)
    if model_cfg.audio_encoder == "vggish" and model_cfg.audio_weights is None:
        raise UserError("--audio-weights is required: the released model reads a frozen, pretrained VGGish "
                        "(torchvggish's vggish-10086976.pth)")
    shards = ShardSet.load(shards_path(work, dataset))
    model = build_model(model_cfg, shards, torch.device("cpu"))
    try:
        weights, dropped = fmt.keys.to_icf(state, checkpoint.trainable_state(model))
    except ValueError as err:
        raise UserError(f"{source}: does not fit {method} ({preset_name}, {dataset}): {err}") from None
    checkpoint.load_model_state(model, weights, source)
    ensure_writable(out, "--out")
    checkpoint.save_weights(out / checkpoint.CHECKPOINT, weights, step=0)
    write_run_file(out, run_spec, model_cfg, train_cfg,
                   imported={"from": source.name, "sha256": sha256(source), "format": fmt.name})
    return {"run": str(out), "tensors": len(weights), "dropped": len(dropped)}


@user_errors
def import_command(
    method: str = typer.Option(..., "--method", help="A method that reads its authors' checkpoints (tpavi)."),
    dataset: str = dataset_option(help="The AVSBench subset the checkpoint was trained on."),
    source: Path = typer.Option(..., "--checkpoint", help="The released file (e.g. S4_pvt_best.pth)."),
    backbone: str | None = typer.Option(None, "--backbone", help="resnet50 | pvt_v2_b5: the checkpoint's backbone."),
    preset_name: str | None = typer.Option(None, "--preset", help="Project preset (default: the --backbone's paper preset)."),
    audio_weights: Path | None = typer.Option(
        None, "--audio-weights", help="Pretrained VGGish state dict (torchvggish vggish-10086976.pth), kept frozen."),
    work: Path | None = WorkOption,
    out: Path | None = typer.Option(None, "--out", help="Run folder (default WORK/runs/<method>-official-<dataset>-<file>)."),
    set_: list[str] = typer.Option([], "--set", help="Override key=value after the file's own options; repeatable."),
) -> None:
    """Import a released checkpoint as a run folder (run.json + checkpoint.pt) on the staged shards of
    WORK/<dataset>; then icf eval / predict / compare --run it."""
    root = work_dir(work)
    if not source.is_file():
        raise UserError(f"--checkpoint {source}: file does not exist")
    out = out or root / "runs" / f"{method}-official-{dataset}-{source.stem}"
    summary = import_official(method, dataset, source, pick_preset(backbone, preset_name), root, out,
                              audio_weights, list(set_))
    console.print(f"{summary['tensors']} tensors imported, {summary['dropped']} unused official tensors dropped",
                  highlight=False)
    typer.echo(summary["run"])


def register(app: typer.Typer) -> None:
    """Add ``import`` to the root app."""
    app.command("import")(import_command)
