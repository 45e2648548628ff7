"""``icf compare``: several trained runs, one split, a list of named evaluation settings, one table.

Every run is evaluated with :func:`icf.eval.evaluate.evaluate` (the function ``icf eval`` uses), so a
number here is the number ``icf eval`` prints for that run and setting. Runs whose ``run.json`` agree on
everything but the training seed form a *group*; the table reports each group's mean ± std (sample std,
n − 1) over its runs, per setting, for J, F, J_present, F_present and FDR.

Settings are entries of :data:`SETTINGS`: a name → a factory that takes the option's value (or None) and
returns an :class:`EvalSetting` (a label and the function that evaluates one run under it). Adding a
setting, e.g. a negative-audio one, is one entry::

    SETTINGS["silence"] = lambda _value: EvalSetting("silence", silence_eval)  # any RunEval

after which ``icf compare --setting silence`` runs it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from icf.clitools import UserError, WorkOption, print_json, user_errors

if TYPE_CHECKING:  # the CLI imports this module at start-up: torch loads only when a command runs
    import torch

    from icf.data.shards import ShardSet
    from icf.eval.evaluate import Perturbation, Predictor

METRICS = ("J", "F", "J_present", "F_present", "FDR", "J_dh", "F_dh")  # J_dh, F_dh: DDESeg's protocol
BOUNDARY_METRICS = ("F_boundary", "JF_boundary")  # QDFormer's DAVIS F and J&F, shown when compared runs have them (S4/MS3)
NEGATIVE_METRICS = ("FPR_frame", "FPR_pixel", "HM")  # shown when a negative-audio setting is compared
MODALITY_METRICS = ("phi_audio", "phi_vision")  # shown when the modality setting is compared (icf.eval.modality)
# run.json keys that do not make two runs different methods/configurations
SEED_KEYS = (("train", "seed"),)
IGNORED_KEYS = ("checkpoint_every",)

RunEval = Callable[["Predictor", "ShardSet", str, int, "torch.device"], dict[str, Any]]


@dataclass(frozen=True)
class EvalSetting:
    """One column group of the table: its label and how one run is evaluated under it.

    ``run(predict, shards, split, image_size, device)`` returns a metrics dict with (at least) the keys
    of :data:`METRICS` that apply.
    """

    label: str
    run: RunEval


def perturbed_eval(p: Perturbation | None = None, f_mode: str = "official", **fields: Any) -> RunEval:
    """The ``icf eval`` evaluation under perturbation ``p`` (or ``Perturbation(**fields)``)."""
    from icf.eval.evaluate import Perturbation, evaluate

    p = p if p is not None else Perturbation(**fields)

    def run(predict: Predictor, shards: ShardSet, split: str, image_size: int, device: torch.device) -> dict[str, Any]:
        return evaluate(predict, shards, split, image_size, f_mode, p, device=device)

    return run


def negative_eval(kind: str, seed: int = 0, f_mode: str = "official") -> RunEval:
    """``icf eval --negative KIND``: the false-positive rates under negative audio and HM (harmonic mean of the
    clean J on positives and 1 − FPR_frame; `icf.eval.metrics.negative_score`)."""
    from icf.eval.evaluate import evaluate
    from icf.eval.metrics import negative_score, positive_j
    from icf.augment.negatives import build_negative

    def run(predict: Predictor, shards: ShardSet, split: str, image_size: int, device: torch.device) -> dict[str, Any]:
        clean = evaluate(predict, shards, split, image_size, f_mode, device=device)
        neg = evaluate(predict, shards, split, image_size, f_mode, device=device,
                       negative=build_negative(kind, shards, split, device, seed))
        return {**neg, "HM": negative_score(positive_j(clean), neg["FPR_frame"])}

    return run


def _value(name: str, value: str | None) -> float:
    if value is None:
        raise UserError(f"setting {name!r} needs a value ({name}=VALUE)")
    try:
        return float(value)
    except ValueError:
        raise UserError(f"setting {name}={value}: not a number") from None


SETTINGS: dict[str, Callable[[str | None], EvalSetting]] = {
    "clean": lambda _v: EvalSetting("clean", perturbed_eval()),
    "snr": lambda v: EvalSetting(f"snr {_value('snr', v):g} dB", perturbed_eval(snr_db=_value("snr", v))),
    "frame-mix": lambda v: EvalSetting(f"frame-mix {_value('frame-mix', v):g}", perturbed_eval(frame_mix=_value("frame-mix", v))),
    "shuffled-audio": lambda _v: EvalSetting("shuffled audio", perturbed_eval(shuffle_audio=True)),
    "silence": lambda _v: EvalSetting("negative: silence", negative_eval("silence")),
    "noise": lambda _v: EvalSetting("negative: noise", negative_eval("noise")),
    "offscreen": lambda _v: EvalSetting("negative: offscreen", negative_eval("offscreen")),
    "modality": lambda v: modality_setting(v or "J"),
}


def modality_setting(metric: str) -> EvalSetting:
    """``modality[=METRIC]``: the Shapley values of audio and vision for ``metric`` (default J;
    `icf.eval.modality`), with the clean metrics in the row's other columns."""
    from icf.eval.modality import modality_eval

    if metric not in METRICS:
        raise UserError(f"setting modality={metric}: expected one of {', '.join(METRICS)}")
    return EvalSetting(f"modality Shapley ({metric})", modality_eval(metric))


def parse_setting(text: str) -> EvalSetting:
    """``NAME`` or ``NAME=VALUE`` → the registered setting (``UserError`` listing the known names)."""
    name, _, value = text.partition("=")
    if name not in SETTINGS:
        raise UserError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name](value or None)


def split_values(options: Sequence[str]) -> list[str]:
    """Repeated and/or comma-separated option values: ``["10,0", "-10"]`` → ``["10", "0", "-10"]``."""
    return [v.strip() for opt in options for v in opt.split(",") if v.strip()]


def settings_from_options(snr_db: Sequence[str], frame_mix: Sequence[str], extra: Sequence[str], clean: bool = True) -> list[EvalSetting]:
    """clean, then one setting per ``--snr-db`` / ``--frame-mix`` value, then each ``--setting``."""
    texts = ((["clean"] if clean else []) + [f"snr={v}" for v in split_values(snr_db)]
             + [f"frame-mix={v}" for v in split_values(frame_mix)] + list(extra))
    return [parse_setting(t) for t in texts]


# ---------------------------------------------------------------------------------------------- runs


def configuration(doc: dict[str, Any]) -> str:
    """The run's configuration without its seed: what runs must share to be averaged together."""
    doc = json.loads(json.dumps(doc))
    for section, key in SEED_KEYS:
        doc.get(section, {}).pop(key, None)
    for key in IGNORED_KEYS:
        doc.pop(key, None)
    return json.dumps(doc, sort_keys=True)


def run_label(doc: dict[str, Any]) -> str:
    """Short name of a run's configuration: its method (run.json ``method``, when named) and preset, and what it
    ablates."""
    name = " ".join(str(doc[k]) for k in ("method", "preset") if doc.get(k)) or "?"
    ablate = doc.get("model", {}).get("ablate") or []
    return f"{name} −{','.join(sorted(ablate))}" if ablate else str(name)


def steps_done(run: Path) -> int | None:
    """The last step ``metrics.jsonl`` records (None when the run has none)."""
    from icf.train.logs import read_metrics

    records = read_metrics(run)
    return int(records[-1]["step"]) if records else None


def evaluate_runs(runs: Sequence[Path], split: str, settings: Sequence[EvalSetting],
                  on_eval: Callable[[], None] | None = None, which: str = "auto",
                  allow_other_shards: bool = False) -> list[dict[str, Any]]:
    """Every run under every setting: ``[{run, doc, steps, loaded, shards_key, results: {label: metrics}}]`` in
    input order; ``which`` picks each run's checkpoint (`icf.train.run.checkpoint_path`), ``loaded`` says which was
    scored; ``other_shards`` says what differs when ``allow_other_shards`` let a run be evaluated on shards other
    than those it trained on (`icf.train.binding`)."""
    from icf.config import to_dict
    from icf.eval.evaluate import model_predictor
    from icf.train.run import load_trained

    out = []
    for run in runs:
        model, shards, doc, model_cfg, train_cfg = load_trained(run, which=which, allow_other_shards=allow_other_shards)
        # The configs as the model was built from them: a field added since the run was written counts as its
        # default, so older and newer runs of one configuration still form one group (`configuration`).
        doc = {**doc, **to_dict(model_cfg, train_cfg)}
        device = next(model.parameters()).device
        predict = model_predictor(model)
        results = {}
        for s in settings:
            results[s.label] = s.run(predict, shards, split, model_cfg.image_size, device)
            if on_eval is not None:
                on_eval()
        out.append({"run": str(run), "doc": doc, "seed": train_cfg.seed, "steps": steps_done(run), "loaded": doc["loaded"],
                    "shards_key": shards.cache_key, "other_shards": doc.get("other_shards"),
                    "planned_steps": train_cfg.max_steps, "results": results})
    return out


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """``{mean, std, n}``; std is the sample std (n − 1), 0 for a single value; NaNs are left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(vals) / len(vals)
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": std, "n": len(vals)}


def group_runs(evaluated: Sequence[dict[str, Any]], labels: Sequence[str], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Runs sharing a configuration (all but the seed) → one group with mean ± std per setting and metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in evaluated:
        groups.setdefault(configuration(r["doc"]), []).append(r)
    names: dict[str, int] = {}
    out = []
    for members in groups.values():
        name = run_label(members[0]["doc"])
        names[name] = names.get(name, 0) + 1
        out.append({
            "name": name if names[name] == 1 else f"{name} #{names[name]}",
            "method": members[0]["doc"].get("method"),
            "shards_key": ",".join(dict.fromkeys(m["shards_key"] for m in members)),
            "runs": [m["run"] for m in members],
            "seeds": [m["seed"] for m in members],
            "steps": [m["steps"] for m in members],
            "planned_steps": members[0]["planned_steps"],
            "settings": {lab: {k: mean_std([m["results"][lab].get(k) for m in members]) for k in metrics} for lab in labels},
        })
    return out


# ---------------------------------------------------------------------------------------------- output


def distinct_runs(runs: Sequence[Path]) -> list[Path]:
    """``runs`` in order with a run given twice (the same folder by any path) kept once, so that it counts as one
    seed, not two."""
    seen: set[Path] = set()
    kept = []
    for run in runs:
        if Path(run).resolve() not in seen:
            seen.add(Path(run).resolve())
            kept.append(run)
    return kept


def run_dataset(runs: Sequence[Path]) -> str:
    """The one dataset ``runs`` were trained on; ``UserError`` for runs of different datasets (their numbers do not
    compare), before anything is evaluated."""
    from icf.train.run import read_run_file

    datasets = {run: read_run_file(run)[1].dataset for run in runs}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{run} ({d})" for run, d in datasets.items())
        raise UserError(f"the runs were trained on different datasets: {listed}; compare runs of one dataset")
    return next(iter(datasets.values()))


def comparison(runs: Sequence[Path], split: str, settings: Sequence[EvalSetting],
               on_eval: Callable[[], None] | None = None, which: str = "auto",
               allow_other_shards: bool = False) -> dict[str, Any]:
    """The whole comparison as one JSON-able document (``dataset``, ``groups`` and the per-run ``runs``)."""
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise UserError(f"settings repeat: {labels}")
    runs = distinct_runs(runs)
    dataset = run_dataset(runs)
    evaluated = evaluate_runs(runs, split, settings, on_eval, which, allow_other_shards)
    found = {k for r in evaluated for res in r["results"].values() for k in res}
    metrics = [*METRICS, *(m for m in (*BOUNDARY_METRICS, *NEGATIVE_METRICS, *MODALITY_METRICS) if m in found)]
    return {
        "dataset": dataset,
        "split": split,
        "checkpoint": which,
        "settings": labels,
        "metrics": metrics,
        "groups": group_runs(evaluated, labels, metrics),
        "runs": [{k: v for k, v in r.items() if k != "doc"} | {"method": r["doc"].get("method"), "label": run_label(r["doc"])}
                 for r in evaluated],
    }


def _cell(stat: dict[str, float | int]) -> str:
    if not stat["n"]:
        return ""
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * stat['std']:.2f}" if stat["n"] > 1 else "")


def _steps(group: dict[str, Any]) -> str:
    done = [s for s in group["steps"] if s is not None]
    if not done:
        return ""
    text = f"{min(done)}" if min(done) == max(done) else f"{min(done)}–{max(done)}"
    return f"{text}/{group['planned_steps']}" if group["planned_steps"] else text


def table(doc: dict[str, Any], title: str = ""):
    """A rich table: one row per (group, setting); metrics ×100 as mean ± std over the group's seeds. The title
    names the shards' cache key; a ``shards`` column appears instead when the groups' keys differ."""
    from rich.table import Table

    show_method = any(g["method"] for g in doc["groups"])
    keys = sorted({g["shards_key"] for g in doc["groups"]})
    show_keys = len(keys) > 1
    shards = "shards per group" if show_keys else f"shards {keys[0]}"
    t = Table(title=f"{title}, {shards}" if title else shards)
    for col in ("group", *(("method",) if show_method else ()), *(("shards",) if show_keys else ()), "seeds", "steps", "setting"):
        t.add_column(col)
    for m in doc["metrics"]:
        t.add_column(f"{m} ×100", justify="right")
    for g in doc["groups"]:
        for i, lab in enumerate(doc["settings"]):
            head = [g["name"] if i == 0 else "", *((g["method"] or "",) if show_method else ()),
                    *((g["shards_key"] if i == 0 else "",) if show_keys else ()),
                    str(len(g["seeds"])) if i == 0 else "", _steps(g) if i == 0 else "", lab]
            t.add_row(*head, *(_cell(g["settings"][lab][m]) for m in doc["metrics"]))
    return t


def csv_text(doc: dict[str, Any]) -> str:
    """One CSV row per (group, setting): group, method, dataset, shards key, runs, setting, then ``<metric>_mean``
    and ``_std``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "method", "dataset", "shards_key", "runs", "setting",
                *(f"{m}_{s}" for m in doc["metrics"] for s in ("mean", "std"))])
    for g in doc["groups"]:
        for lab in doc["settings"]:
            stats = g["settings"][lab]
            w.writerow([g["name"], g["method"] or "", doc["dataset"], g["shards_key"], len(g["runs"]), lab,
                        *(f"{stats[m][s]:.6f}" for m in doc["metrics"] for s in ("mean", "std"))])
    return buf.getvalue()


def bar_chart(doc: dict[str, Any], path: Path, metrics: Sequence[str] = ("J_present", "F_present", "FDR")) -> None:
    """Grouped bars: one panel per metric, settings on the x axis, one bar (± std) per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from icf.pipeline.store import atomic_write

    groups, labels = doc["groups"], doc["settings"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 + 0.5 * len(groups) * len(labels)) * len(metrics) / 1.5, 3.8),
                             squeeze=False)
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(labels))
    for ax, metric in zip(axes[0], metrics):
        for i, g in enumerate(groups):
            means = [100 * g["settings"][lab][metric]["mean"] for lab in labels]
            stds = [100 * g["settings"][lab][metric]["std"] if g["settings"][lab][metric]["n"] > 1 else 0.0 for lab in labels]
            ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=g["name"])
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{metric} ×100 ({doc['split']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_outputs(doc: dict[str, Any], out: Path) -> list[Path]:
    """``compare.json``, ``compare.csv`` and ``compare.png`` in ``out``."""
    from icf.pipeline.store import atomic_write, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", doc)
    atomic_write(out / "compare.csv", csv_text(doc).encode())
    bar_chart(doc, out / "compare.png")
    return [out / "compare.json", out / "compare.csv", out / "compare.png"]


def check_noisable(runs: list[Path]) -> None:
    """``UserError`` for a run whose method's audio the SNR setting cannot reach (`robustness.snr_refusal`)."""
    from icf import methods
    from icf.eval.robustness import snr_refusal
    from icf.train.run import read_run_file

    for run in runs:
        name = read_run_file(run)[1].method
        problem = snr_refusal(name, methods.get(name).audio_keys)
        if problem:
            raise UserError(f"{run}: {problem}")



# ---------------------------------------------------------------------------------------------- command


@user_errors
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Training run folders (each holds run.json and checkpoint.pt), or names under WORK/runs."),
    work: Path | None = WorkOption,
    split: str = typer.Option("test", "--split", help="val | test"),
    snr_db: list[str] = typer.Option([], "--snr-db", help="Also evaluate with background noise at these SNRs (dB), e.g. 10,0,-10."),
    frame_mix: list[str] = typer.Option([], "--frame-mix", help="Also evaluate with these fractions of clips frame-mixed, e.g. 0.25."),
    negative: list[str] = typer.Option([], "--negative", help="Also evaluate with negative audio: silence | noise | offscreen (repeatable)."),
    setting: list[str] = typer.Option([], "--setting", help=f"Also evaluate a named setting NAME[=VALUE] ({', '.join(SETTINGS)})."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object instead of a table."),
    out_dir: Path | None = typer.Option(None, "--out", help="Write compare.json, compare.csv and compare.png here."),
    which: str = typer.Option("auto", "--checkpoint", help="Weights of every run: best (best.pt), last (checkpoint.pt) "
                              "or auto (best when a run validated, else last); the JSON's runs say which was loaded."),
    allow_other_shards: bool = typer.Option(
        False, "--allow-other-shards", help="Evaluate runs even on shards other than those they trained on (the "
        "table says so)."),
) -> None:
    """Evaluate several runs on one split under clean and robustness settings; mean ± std over seeds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from icf.clitools import console, out
    from icf.train.run import checkpoint_path, find_run

    given = [find_run(r, work) for r in runs]
    runs = distinct_runs(given)
    if len(runs) < len(given):
        console.print(f"note: {len(given) - len(runs)} run(s) given twice, counted once", highlight=False)
    if split not in ("val", "test"):
        raise UserError(f"--split must be val or test, got {split!r}")
    loaded = [checkpoint_path(r, which).name for r in runs]  # refuses --checkpoint best of a run that never validated
    chosen = settings_from_options(snr_db, frame_mix, [*split_values(negative), *setting])
    if any(s.label.startswith("snr ") for s in chosen):
        check_noisable(list(runs))
    bar = Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console, disable=as_json)
    with bar:
        task = bar.add_task("compare", total=len(runs) * len(chosen))
        doc = comparison(runs, split, chosen, lambda: bar.advance(task), which, allow_other_shards)
    if out_dir is not None:
        paths = write_outputs(doc, out_dir)
    if as_json:
        print_json(doc)
        return
    weights = ", ".join(f"{n} {name}" for name, n in sorted(Counter(loaded).items()))
    out.print(table(doc, title=f"{len(runs)} {doc['dataset']} runs ({weights}), {split} split (×100, mean ± std over seeds)"))
    for r in doc["runs"]:
        if r["other_shards"]:
            out.print(f"{r['run']}: evaluated {r['other_shards']}", highlight=False)
    if out_dir is not None:
        out.print("wrote " + ", ".join(str(p) for p in paths))
