"""Table 2 of ICF in miniature: the component ablation on synthetic AVSS, with semantic and random towers.

For each kind of towers (``semantic``: ``icf towers`` trained on the synthetic train split; ``random``:
the tiny random towers) the synthetic tree is staged into its own workspace, then every row

    baseline (no MIT/SC/CDCL), MIT, CDCL, MIT+SC, MIT+CDCL, full, and ``lambda_mit=0`` (full, Eq. 3's matching
    objective off: does MIT's text help only through its own loss?)

(``--rows`` also takes the per-term controls ``lambda_cf=0``, ``lambda_va=0``, ``lambda_vl=0``, ``lambda_al=0``,
``lambda_z=0``, ``lambda_ortho=0``: full ICF with that one loss weight off; and ``cdcl_visual_pool=mask``: full ICF
with CDCL's visual vectors pooled over the predicted foreground)

is trained with each seed for the same number of steps, and ``icf compare`` evaluates them all on one
split, clean and under background noise (``--snr-db``) and frame mixing (``--frame-mix``). The tables
(mean ± std over seeds, ×100) are printed and written as ``compare.json/csv/png`` per kind, plus
``ablation.json`` with both (``--results`` copies it into the repository, e.g. ``bench/results/``).

Everything is cached: the data, the towers, the stages, and every finished run (a rerun only evaluates); a run
stopped part-way resumes from its checkpoint. ``--eval-only`` trains nothing and compares the runs finished so far
(rows and seeds with no finished run are left out), so a partial measurement can be published while the rest runs.
Besides the JSON, ``table.md`` (mean ± std ×100 per row and setting, with the seeds each row had, then every row
minus ``--paired-to`` paired by seed) is written.

    python bench/ablation.py --work /tmp/ablation [--seeds 0,1,2] [--steps 600] [--clips 200]
    python bench/ablation.py --work /tmp/abl-smoke --seeds 0 --steps 3 --clips 24 --rows baseline,full  # smoke
    python bench/ablation.py --work /tmp/ablation --eval-only --results bench/results      # publish what is done
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from icf.clitools import out
from icf.demo import LAYOUT, TOWER_EPOCHS, _icf, epochs_for_steps, semantic_towers
from icf.eval.compare import comparison, mean_std, settings_from_options, table, write_outputs
from icf.train import checkpoint
from icf.train.run import RunSpec
from icf.train.trainer import train

# Table 2's rows as the components each one switches off (--ablate; SC needs MIT) and any --set overrides.
ROWS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "baseline": (frozenset({"mit", "sc", "cdcl"}), ()),
    "MIT": (frozenset({"sc", "cdcl"}), ()),
    "CDCL": (frozenset({"mit", "sc"}), ()),
    "MIT+SC": (frozenset({"cdcl"}), ()),
    "MIT+CDCL": (frozenset({"sc"}), ()),
    "full": (frozenset(), ()),
    "lambda_mit=0": (frozenset(), ("model.lambda_mit=0",)),
}
# Per-term controls (issue 24, item 3): full ICF with one loss weight of Eq. 19 (or Eq. 3's) set to 0.
TERMS = ("cf", "va", "vl", "al", "z", "ortho")
ROWS.update({f"lambda_{t}=0": (frozenset(), (f"model.lambda_{t}=0",)) for t in TERMS})
# Full ICF with CDCL's F^v masked-average-pooled by the predicted foreground (supplement note 6) instead of the frame mean.
ROWS["cdcl_visual_pool=mask"] = (frozenset(), ("model.cdcl_visual_pool=mask",))
TABLE2 = ("baseline", "MIT", "CDCL", "MIT+SC", "MIT+CDCL", "full", "lambda_mit=0")
TOWERS = ("semantic", "random")


def stage(data: Path, work: Path, towers: str, size: int, seed: int, tower_epochs: int, executor: str) -> None:
    """Stage the synthetic tree into ``work`` with semantic (trained here, cached) or random towers."""
    encoders = str(semantic_towers(data, work, seed, tower_epochs)) if towers == "semantic" else "tiny"
    _icf("stage", "all", "--dataset", LAYOUT, "--root", str(data), "--work", str(work), "--encoders", encoders,
         "--image-size", str(size), "--executor", executor)


def finished(run: Path, steps: int) -> bool:
    """The run's latest checkpoint is at ``steps``; refuses a run planned for another budget (its learning-rate
    schedule differs: use another ``--work`` for another ``--steps``)."""
    planned = json.loads((run / "run.json").read_text())["train"]["max_steps"] if (run / "run.json").is_file() else steps
    if planned != steps:
        raise SystemExit(f"error: {run} was trained for {planned} steps, not --steps {steps}; use another --work")
    path = run / checkpoint.CHECKPOINT
    return path.is_file() and checkpoint.load(path)["step"] >= steps


def run_folder(work: Path, row: str, seed: int) -> Path:
    return work / "runs" / f"{row.replace('+', '-').replace('=', '')}-s{seed}"


def train_rows(work: Path, rows: list[str], seeds: list[int], steps: int, train_missing: bool = True) -> dict[Path, str]:
    """Train every (row, seed) for ``steps`` steps (skipping finished runs, resuming stopped ones; with
    ``train_missing`` False only the finished ones are kept); ``{run folder: row}``."""
    epochs = epochs_for_steps(work, steps)
    runs = {}
    for row in rows:
        for seed in seeds:
            run = run_folder(work, row, seed)
            if not finished(run, steps):
                if not train_missing:
                    continue
                resume = (run / checkpoint.CHECKPOINT).is_file()
                if not resume and run.exists():  # stopped before its first checkpoint: start again
                    shutil.rmtree(run)
                out.print(f"[bold]{'resume' if resume else 'train'}[/] {row} seed {seed} ({steps} steps)")
                ablate, overrides = ROWS[row]
                spec = RunSpec(dataset=LAYOUT, preset="tiny", work=work, out=run, epochs=epochs, max_steps=steps,
                               ablate=ablate, seed=seed, overrides=list(overrides))
                train(spec, resume=resume)
            runs[run] = row
    return runs


def markdown(doc: dict, rows: list[str]) -> str:
    """One markdown table: a line per row (in ``rows`` order) with each setting's J_present (and the clean
    J_dh, F_present) as mean ± std ×100 over its seeds."""
    cell = lambda stat: f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}" if stat["n"] > 1 else (  # noqa: E731
        f"{100 * stat['mean']:.2f}" if stat["n"] else "")
    settings = doc["settings"]
    head = ["row", "seeds", *(f"J_present {s}" for s in settings), "J_dh clean", "F_present clean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_name = {g["name"]: g for g in doc["groups"]}
    for row in (r for r in rows if r in by_name):
        g = by_name[row]
        clean = g["settings"][settings[0]]
        seeds = ",".join(str(s) for s in sorted(g["seeds"]))
        lines.append("| " + " | ".join([row, seeds, *(cell(g["settings"][s]["J_present"]) for s in settings),
                                       cell(clean.get("J_dh", {"n": 0})), cell(clean["F_present"])]) + " |")
    return "\n".join(lines) + "\n"


def paired(doc: dict, rows: list[str], reference: str, metric: str = "J_present") -> dict[str, dict]:
    """Each row minus ``reference`` on ``metric``, paired by seed: ``{row: {setting: {mean, std, n, above}}}``.

    Seeds trained by both rows only; ``above`` counts the seeds where the row scores higher. Pairing removes what a
    seed does to both rows alike (data order, initialisation), so a difference can show inside the rows' spread.
    """
    by_name = {g["name"]: g for g in doc["groups"]}
    if reference not in by_name:
        return {}
    per_run = {r["run"]: r["results"] for r in doc["runs"]}

    def by_seed(group: dict) -> dict[int, dict]:
        return {seed: per_run[run] for run, seed in zip(group["runs"], group["seeds"])}

    ref = by_seed(by_name[reference])
    out = {}
    for row in (r for r in rows if r in by_name and r != reference):
        own = by_seed(by_name[row])
        seeds = sorted(set(own) & set(ref))
        if not seeds:
            continue
        out[row] = {}
        for setting in doc["settings"]:
            deltas = [own[s][setting][metric] - ref[s][setting][metric] for s in seeds]
            out[row][setting] = {**mean_std(deltas), "above": sum(d > 0 for d in deltas)}
    return out


def paired_markdown(doc: dict, rows: list[str], reference: str) -> str:
    """``paired`` as a markdown table: Δ J_present ×100 (mean ± std over shared seeds, rows above on k of n seeds)."""
    deltas = paired(doc, rows, reference)
    if not deltas:
        return ""
    head = ["row", "seeds", *(f"Δ J_present {s}" for s in doc["settings"])]
    lines = [f"Paired by seed against {reference} (row − {reference}, ×100; k/n: seeds where the row is higher):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, by_setting in deltas.items():
        first = next(iter(by_setting.values()))
        cells = [(f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}" if d["n"] > 1 else f"{100 * d['mean']:+.2f}")
                 + f" ({d['above']}/{d['n']})" for d in by_setting.values()]
        lines.append("| " + " | ".join([row, str(first["n"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600, help="Training steps of every run (equal budgets).")
    p.add_argument("--rows", default=",".join(TABLE2), help=f"Comma-separated rows of: {', '.join(ROWS)}.")
    p.add_argument("--towers", default=",".join(TOWERS))
    p.add_argument("--tower-epochs", type=int, default=TOWER_EPOCHS)
    p.add_argument("--split", default="val")
    p.add_argument("--snr-db", default="10,0,-10")
    p.add_argument("--frame-mix", default="0.25")
    p.add_argument("--executor", default="local")
    p.add_argument("--results", type=Path, help="Also write ablation.json here (a folder, e.g. bench/results/).")
    p.add_argument("--eval-only", action="store_true", help="Train nothing: compare the runs finished so far.")
    p.add_argument("--paired-to", default="baseline",
                   help="table.md also lists every row minus this one, paired by seed (if it is among the rows run).")
    args = p.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS)) + sorted(set(args.towers.split(",")) - set(TOWERS))
    if unknown:
        p.error(f"unknown rows/towers {unknown}; rows: {', '.join(ROWS)}; towers: {', '.join(TOWERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    data = (args.work / "data" / "AVSS").resolve()
    if not (data / "metadata.csv").is_file():
        _icf("synth", "--layout", LAYOUT, "--out", str(data), "--clips", str(args.clips), "--size", str(args.size), "--seed", "0")
    settings = settings_from_options([args.snr_db], [args.frame_mix], [])
    summary = {"steps": args.steps, "seeds": seeds, "clips": args.clips, "split": args.split, "tables": {}}
    for kind in args.towers.split(","):
        t0 = time.time()
        work = args.work / f"work-{kind}"
        stage(data, work, kind, args.size, 0, args.tower_epochs, args.executor)
        runs = train_rows(work, rows, seeds, args.steps, train_missing=not args.eval_only)
        if not runs:
            out.print(f"{kind}: no finished run yet")
            continue
        doc = comparison(list(runs), args.split, settings)
        for group in doc["groups"]:
            group["name"] = runs[Path(group["runs"][0])]
        write_outputs(doc, work / "compare")
        out.print(table(doc, title=f"{kind} towers: {len(rows)} rows × {len(seeds)} seeds, {args.steps} steps, "
                                   f"{args.split} split (×100, mean ± std)"))
        summary["tables"][kind] = doc
        out.print(f"{kind}: {time.time() - t0:.0f} s, outputs in {work / 'compare'}")
    text = json.dumps(summary, indent=1, sort_keys=True)
    tables = "".join(f"\n{kind} towers, {args.steps} steps, {args.split} split (×100, mean ± std over seeds):\n\n"
                     + markdown(doc, rows) + "\n" + paired_markdown(doc, rows, args.paired_to)
                     for kind, doc in summary["tables"].items())
    for folder in filter(None, (args.work, args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ablation.json").write_text(text)
        (folder / "table.md").write_text(tables)
        out.print(f"wrote {folder / 'ablation.json'} and {folder / 'table.md'}")


if __name__ == "__main__":
    main()
