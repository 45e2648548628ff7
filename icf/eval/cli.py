"""``icf score`` (official metrics on PNG predictions), ``icf eval`` and ``icf predict`` (trained runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from icf.clitools import UserError, WorkOption, check_at_least, dataset_option, print_json, user_errors
from icf.eval.compare import check_noisable, compare_command

FModeOption = typer.Option("official", "--f-mode", help="F aggregation: official (batches of 4 clips) or dataset.")
JsonOption = typer.Option(False, "--json", help="Print one JSON object instead of a table.")
PaddingOption = typer.Option(
    "real", "--avss-padding", help="AVSS frames scored: real (frames with ground truth) or official (v1s/v1m clips "
    "padded to 10 all-background frames, as the official AVSS test).")
CheckpointOption = typer.Option(
    "auto", "--checkpoint", help="Weights to load: best (best.pt, chosen on val), last (checkpoint.pt), or auto "
    "(best when the run validated, else last).")
AllowOtherShardsOption = typer.Option(
    False, "--allow-other-shards", help="Evaluate even when the workspace's shards differ from those the run trained on "
    "(the report says so).")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_protocol(dataset: str, f_mode: str, avss_padding: str) -> None:
    """``--f-mode`` and ``--avss-padding`` name known protocols, and the padding one is asked of AVSS only."""
    from icf.data.datasets import load_info
    from icf.eval.metrics import AVSS_PADDINGS, F_MODES

    _check_choice("--f-mode", f_mode, F_MODES)
    _check_choice("--avss-padding", avss_padding, AVSS_PADDINGS)
    if avss_padding != "real" and load_info(dataset).binary:
        raise UserError(f"--avss-padding {avss_padding} applies to AVSS only; {dataset} has no padded frames")


def _with_protocols(result: dict, dataset: str, f_mode: str, avss_padding: str) -> dict:
    """``result`` plus ``protocols``: each metric key → the protocol and source it follows."""
    from icf.data.datasets import load_info
    from icf.eval.metrics import protocols

    return {**result, "protocols": protocols(result, load_info(dataset).binary, f_mode, avss_padding)}


def _loaded_text(loaded: dict) -> str:
    """``best.pt, step 120`` — which weights a report scored (`icf.train.run.load_trained`'s ``loaded``)."""
    return f"{loaded['checkpoint']}, step {loaded['step']}"


def _check_eval_options(snr_db: float | None, frame_mix: float | None, limit: int | None) -> None:
    """Before the model loads: a finite SNR, a frame-mix fraction in [0, 1], a positive clip limit."""
    from icf.clitools import UserError, check_at_least

    if snr_db is not None and (snr_db != snr_db or abs(snr_db) == float("inf")):
        raise UserError(f"--snr-db must be a finite number of dB, got {snr_db}")
    if frame_mix is not None and not 0.0 <= frame_mix <= 1.0:
        raise UserError(f"--frame-mix must be a fraction in [0, 1], got {frame_mix}")
    check_at_least("--limit", limit, 1)


@user_errors
def score(
    dataset: str = dataset_option(),
    root: Path = typer.Option(..., "--root", help="Dataset root (the folder holding the metadata CSV)."),
    pred: Path = typer.Option(..., "--pred", help="Prediction PNGs at PRED/<GT mask path relative to ROOT>."),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    f_mode: str = FModeOption,
    avss_padding: str = PaddingOption,
    resize: bool = typer.Option(False, "--resize", help="Resize predictions whose size differs from the mask."),
    as_json: bool = JsonOption,
) -> None:
    """Official AVSBench metrics (J, F, FDR; AVSS mIoU; S4/MS3 DAVIS boundary F) of any method's PNG predictions."""
    from icf.eval.report import print_results
    from icf.eval.score import score_predictions

    _check_protocol(dataset, f_mode, avss_padding)
    result = score_predictions(dataset, root, pred, split, f_mode, resize, avss_padding)
    print_results({f"{dataset} {split}": _with_protocols(result, dataset, f_mode, avss_padding)}, as_json, title=f"{pred}")


@user_errors
def eval_command(
    run: Path = typer.Option(..., "--run", help="Training run folder (holds run.json and checkpoint.pt), or its name under WORK/runs."),
    work: Path | None = WorkOption,
    split: str = typer.Option("test", "--split", help="val | test"),
    f_mode: str = FModeOption,
    snr_db: float | None = typer.Option(None, "--snr-db", help="Mix white background noise into the audio at this SNR (dB)."),
    frame_mix: float | None = typer.Option(None, "--frame-mix", help="Fraction of clips whose frames are swapped with other clips'."),
    shuffle_audio: bool = typer.Option(False, "--shuffle-audio", help="Give every clip another clip's audio (control)."),
    negative: list[str] | None = typer.Option(
        None, "--negative", help="Negative audio: silence | noise | offscreen (repeatable); reports FPR and HM."),
    synth: str | None = typer.Option(
        None, "--synth", help="CLIPS:SEED[:CLASSES] of the `icf synth` tree behind synthetic shards: offscreen then "
        "knows every visible object (silent ones too) and every sound (off-screen ones too)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N clips of the split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise, frame mixing and negatives."),
    avss_padding: str = PaddingOption,
    which: str = CheckpointOption,
    as_json: bool = JsonOption,
    allow_other_shards: bool = AllowOtherShardsOption,
) -> None:
    """Official metrics of a trained run on the val/test shards, optionally under the robustness settings
    or with negative audio (false-positive rates per setting, and HM: harmonic mean of J and 1 − FPR_frame)."""
    from icf.eval.evaluate import Perturbation, evaluate, evaluate_negatives, model_predictor
    from icf.augment.negatives import NEGATIVE_KINDS, build_negative
    from icf.eval.report import print_results
    from icf.train.run import checkpoint_path, find_run, load_trained, read_run_file

    run = find_run(run, work)
    _check_eval_options(snr_db, frame_mix, limit)  # the options alone first: a bad value is named before any file is read
    _check_protocol(read_run_file(run)[1].dataset, f_mode, avss_padding)
    checkpoint_path(run, which)  # an unknown choice, or best of a run that never validated: refused before the model loads
    pert = Perturbation(snr_db=snr_db, frame_mix=frame_mix, shuffle_audio=shuffle_audio, seed=seed)
    if negative and pert != Perturbation(seed=seed):
        raise UserError("--negative cannot be combined with --snr-db, --frame-mix or --shuffle-audio")
    for kind in negative or []:
        _check_choice("--negative", kind, NEGATIVE_KINDS)
    if snr_db is not None:
        check_noisable([run])
    model, shards, doc, model_cfg, _ = load_trained(run, which=which, allow_other_shards=allow_other_shards)
    device = next(model.parameters()).device
    other = {"other_shards": doc["other_shards"]} if "other_shards" in doc else {}
    title = f"{run} ({shards.dataset} {split}; {_loaded_text(doc['loaded'])})" + (f" — {other['other_shards']}" if other else "")
    if negative:
        catalog = _synth_catalog(shards.dataset, synth) if synth else None
        settings = [build_negative(kind, shards, split, device, seed, catalog) for kind in dict.fromkeys(negative)]
        rows = evaluate_negatives(model_predictor(model), shards, split, model_cfg.image_size, settings, f_mode, limit,
                                  device, avss_padding)
    else:
        rows = {pert.describe(): evaluate(model_predictor(model), shards, split, model_cfg.image_size, f_mode, pert, limit,
                                          device, avss_padding=avss_padding)}
    rows = {k: {**_with_protocols(r, shards.dataset, f_mode, avss_padding), "loaded": doc["loaded"], **other}
            for k, r in rows.items()}
    print_results(rows, as_json, title=title)


def _synth_catalog(dataset: str, text: str) -> dict:
    """``--synth CLIPS:SEED[:CLASSES]`` → the synthetic class catalog of that tree."""
    from icf.augment.negatives import synthetic_classes

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return synthetic_classes(dataset, *(int(p) for p in parts))
    except ValueError:
        raise UserError(f"--synth must be CLIPS:SEED[:CLASSES] (integers, as given to icf synth), got {text!r}") from None


@user_errors
def predict_command(
    run: Path = typer.Option(..., "--run", help="Training run folder, or its name under WORK/runs."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG panels (and, with --video, overlay.mp4)."),
    work: Path | None = WorkOption,
    split: str = typer.Option("val", "--split", help="train | val | test (shards; not with --video)"),
    limit: int | None = typer.Option(8, "--limit", help="Only the first N clips (default 8; not with --video)."),
    video: Path | None = typer.Option(
        None, "--video", help="Any video file (mp4, mkv, webm, mov): predict on it instead of the shards."),
    audio: Path | None = typer.Option(None, "--audio", help="With --video: a WAV to use instead of the file's own track."),
    seconds: int | None = typer.Option(
        None, "--seconds", help="With --video: window length = frames per clip (default the dataset's longest clip)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    which: str = CheckpointOption,
    allow_other_shards: bool = AllowOtherShardsOption,
) -> None:
    """PNG panels per clip: frames, ground truth and predicted masks overlaid in palette colours; with --video, the
    run on any video file: overlay.mp4 (masks over the frames, with the original audio) and a panel per window."""
    from icf.train.run import checkpoint_path, find_run, load_trained

    run = find_run(run, work)
    _check_eval_options(None, None, limit)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    checkpoint_path(run, which)  # an unknown choice, or best of a run that never validated: refused here
    if video is None and (audio is not None or seconds is not None):
        raise UserError("--audio and --seconds apply to --video")
    if video is not None:
        from icf.eval.video import predict_video

        check_at_least("--seconds", seconds, 1)
        summary = predict_video(run, video, out, audio, seconds, which, allow_other_shards=allow_other_shards)
        if json_out:
            print_json(summary)
        else:
            typer.echo(f"{summary['windows']} windows of {summary['seconds']} s from {video}: {summary['overlay']} "
                       f"and {len(summary['panels'])} panels in {out}")
        return
    from icf.eval.visualize import write_panels

    model, shards, doc, model_cfg, _ = load_trained(run, which=which, allow_other_shards=allow_other_shards)
    paths = write_panels(model, shards, split, model_cfg, out, limit)
    other = {"other_shards": doc["other_shards"]} if "other_shards" in doc else {}
    if json_out:
        print_json({"run": str(run), "split": split, "panels": [str(p) for p in paths], "loaded": doc["loaded"], **other})
    else:
        typer.echo(f"{len(paths)} panels in {out} ({_loaded_text(doc['loaded'])})" + (f" ({other['other_shards']})" if other else ""))


def validate(model, shards, split: str, image_size: int, device):  # noqa: ANN001, ANN201 (types live in torch)
    """`icf.eval.evaluate.validate`, imported when the trainer first validates (the app imports no evaluation module
    until a command needs one)."""
    from icf.eval.evaluate import validate as run_validation

    return run_validation(model, shards, split, image_size, device)


def register(app: typer.Typer) -> None:
    """Add ``score``, ``eval``, ``predict`` and ``compare`` to the root app, and make icf.eval's validation the
    trainer's default (`icf.train.select`: icf.train cannot import icf.eval)."""
    from icf.train.select import set_default_validator

    set_default_validator(validate)
    app.command("score")(score)
    app.command("eval")(eval_command)
    app.command("predict")(predict_command)
    app.command("compare")(compare_command)
