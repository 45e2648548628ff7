"""Table 2 of ICF in miniature: the component ablation on synthetic AVSS, with semantic and random towers.

For each kind of towers (``semantic``: ``icf towers`` trained on the synthetic train split; ``random``:
the tiny random towers) the synthetic tree is staged into its own workspace, then every row

    baseline (no MIT/SC/CDCL), MIT, CDCL, MIT+SC, MIT+CDCL, full, and ``lambda_mit=0`` (full, Eq. 3's matching
    objective off: does MIT's text help only through its own loss?)

is trained with each seed for the same number of steps, and ``icf compare`` evaluates them all on one
split, clean and under background noise (``--snr-db``) and frame mixing (``--frame-mix``). The tables
(mean ± std over seeds, ×100) are printed and written as ``compare.json/csv/png`` per kind, plus
``ablation.json`` with both (``--results`` copies it into the repository, e.g. ``bench/results/``).

Everything is cached: the data, the towers, the stages, and every finished run (a rerun only evaluates).

    python bench/ablation.py --work /tmp/ablation [--seeds 0,1,2] [--steps 600] [--clips 200]
    python bench/ablation.py --work /tmp/abl-smoke --seeds 0 --steps 3 --clips 24 --rows baseline,full  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from icf.clitools import out
from icf.demo import LAYOUT, TOWER_EPOCHS, _icf, epochs_for_steps, semantic_towers
from icf.eval.compare import comparison, settings_from_options, table, write_outputs
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
TOWERS = ("semantic", "random")


def stage(data: Path, work: Path, towers: str, size: int, seed: int, tower_epochs: int, executor: str) -> None:
    """Stage the synthetic tree into ``work`` with semantic (trained here, cached) or random towers."""
    encoders = str(semantic_towers(data, work, seed, tower_epochs)) if towers == "semantic" else "tiny"
    _icf("stage", "all", "--dataset", LAYOUT, "--root", str(data), "--work", str(work), "--encoders", encoders,
         "--image-size", str(size), "--executor", executor)


def finished(run: Path, steps: int) -> bool:
    """The run's latest checkpoint is at ``steps``."""
    path = run / checkpoint.CHECKPOINT
    return path.is_file() and checkpoint.load(path)["step"] >= steps


def train_rows(work: Path, rows: list[str], seeds: list[int], steps: int) -> dict[Path, str]:
    """Train every (row, seed) for ``steps`` steps (skipping finished runs); ``{run folder: row}``."""
    epochs = epochs_for_steps(work, steps)
    runs = {}
    for row in rows:
        for seed in seeds:
            run = work / "runs" / f"{row.replace('+', '-').replace('=', '')}-s{seed}"
            if not finished(run, steps):
                out.print(f"[bold]train[/] {row} seed {seed} ({steps} steps)")
                ablate, overrides = ROWS[row]
                train(RunSpec(dataset=LAYOUT, preset="tiny", work=work, out=run, epochs=epochs, max_steps=steps,
                              ablate=ablate, seed=seed, overrides=list(overrides)))
            runs[run] = row
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600, help="Training steps of every run (equal budgets).")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--towers", default=",".join(TOWERS))
    p.add_argument("--tower-epochs", type=int, default=TOWER_EPOCHS)
    p.add_argument("--split", default="val")
    p.add_argument("--snr-db", default="10,0,-10")
    p.add_argument("--frame-mix", default="0.25")
    p.add_argument("--executor", default="local")
    p.add_argument("--results", type=Path, help="Also write ablation.json here (a folder, e.g. bench/results/).")
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
        runs = train_rows(work, rows, seeds, args.steps)
        doc = comparison(list(runs), args.split, settings)
        for group in doc["groups"]:
            group["name"] = runs[Path(group["runs"][0])]
        write_outputs(doc, work / "compare")
        out.print(table(doc, title=f"{kind} towers: {len(rows)} rows × {len(seeds)} seeds, {args.steps} steps, "
                                   f"{args.split} split (×100, mean ± std)"))
        summary["tables"][kind] = doc
        out.print(f"{kind}: {time.time() - t0:.0f} s, outputs in {work / 'compare'}")
    text = json.dumps(summary, indent=1, sort_keys=True)
    for folder in filter(None, (args.work, args.results)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ablation.json").write_text(text)
        out.print(f"wrote {folder / 'ablation.json'}")


if __name__ == "__main__":
    main()
