"""What runs on a worker for one unit: read inputs, call ``Stage.process`` in batches, write the ledger.

The same function runs in-process (``--executor local``), in a Ray task (CPU stages) and in a Ray actor
(model stages), so every runner produces byte-identical unit files.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from icf.data.sample import Sample
from icf.pipeline.ledger import FAILED, OK, PENDING, SKIPPED, SampleStatus, read_status, unit_path, write_unit
from icf.pipeline.plan import Unit, digest
from icf.pipeline.stage import Inputs, Result, Stage
from icf.pipeline.store import Output, read_outputs


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to (re)compute one unit.

    Attributes:
        unit: the unit (id, split, all its uids).
        samples: the unit's manifest rows as Samples, in ``unit.uids`` order.
        stage_dir: ``WORK/<dataset>/<stage>/<key>``.
        cache_key: written into the stats.
        uid_inputs: uid → input signature now (its manifest row and upstream verdict); the stats record,
            per uid, the signature its result was computed from, and their digest as ``inputs``, so a
            changed clip or upstream verdict makes the unit not-done and only that clip is redone.
        kept_inputs: uid → signature of a kept previous result (not in ``todo``).
        rows, kept_rows: the same for the manifest-row digests alone (``uid_rows`` in the stats, which
            downstream stages compare with the manifest to refuse an out-of-date upstream).
        skipped: uid → reason, for samples an upstream stage failed (not processed here).
        todo: uids to compute now; every other eligible uid keeps its previous result (or stays pending).
        reuse: whether the previous unit files belong to this key/signature and may be merged.
        upstream_dirs: upstream stage name → keyed folder, for ``inputs[uid][stage][name]``.
        batch_size: samples per ``process`` call.
        extra_stats: ``Stage.stats()`` from the driver (e.g. ``weights: random``).
    """

    unit: Unit
    samples: tuple[Sample, ...]
    stage_dir: Path
    cache_key: str
    uid_inputs: Mapping[str, str]
    kept_inputs: Mapping[str, str]
    rows: Mapping[str, str]
    kept_rows: Mapping[str, str]
    skipped: Mapping[str, str]
    todo: tuple[str, ...]
    reuse: bool
    upstream_dirs: Mapping[str, Path]
    batch_size: int
    extra_stats: Mapping[str, object] = field(default_factory=dict)


    @property
    def n_compute(self) -> int:
        """How many samples this job hands to ``process`` (``todo`` minus the upstream-skipped)."""
        return len(set(self.todo) - set(self.skipped))


@dataclass(frozen=True)
class UnitReport:
    """What a worker hands back for one unit: its id, how many clips it computed, the stats it wrote, and
    ``attempt``: how often Ray had resent the unit before this run (0 on the first try; set by the Ray runner)."""

    unit: int
    computed: int
    stats: dict
    attempt: int = 0


def _non_finite(outputs: Mapping[str, Output]) -> str | None:
    """Name of the first float output holding NaN or Inf, or None."""
    for name in sorted(outputs):
        value = outputs[name]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            return name
    return None


def _check(stage: Stage, batch: list[Sample], results: list[Result]) -> None:
    if [r.uid for r in results] != [s.uid for s in batch]:
        raise RuntimeError(f"stage {stage.name!r}: process() must return one result per sample, in order")


def _process(stage: Stage, batch: list[Sample], inputs: Inputs) -> list[Result]:
    """``stage.process(batch)``, holding the contract that a bad sample never stops a unit: if the batch
    raises, each sample is retried alone and the one that raises is failed with the exception as reason."""
    try:
        return stage.process(batch, inputs)
    except Exception:  # noqa: BLE001 - the isolation boundary between one sample and the rest of the run
        results = []
        for sample in batch:
            try:
                results += stage.process([sample], inputs)
            except Exception as err:  # noqa: BLE001
                reason = f"{stage.name} raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                results.append(Result.failed(sample.uid, reason))
        return results


def _load_inputs(job: UnitJob, uids: set[str]) -> dict[str, dict[str, dict[str, Output]]]:
    inputs: dict[str, dict[str, dict[str, Output]]] = {u: {} for u in uids}
    for name, folder in job.upstream_dirs.items():
        for uid, outs in read_outputs(unit_path(folder, job.unit, "out.parquet"), uids).items():
            inputs[uid][name] = outs
    return inputs


def _signatures(job: UnitJob, status: Mapping[str, SampleStatus], computed: set[str]) -> tuple[dict, dict]:
    """Per uid, the input signature and row digest its recorded result belongs to (None while pending)."""
    sigs, rows = {}, {}
    for uid in job.unit.uids:
        if uid in computed or uid in job.skipped:
            sigs[uid], rows[uid] = job.uid_inputs[uid], job.rows[uid]
        elif status[uid].status != PENDING:
            sigs[uid], rows[uid] = job.kept_inputs.get(uid), job.kept_rows.get(uid)
        else:
            sigs[uid] = rows[uid] = None
    return sigs, rows


def run_unit(stage: Stage, job: UnitJob) -> UnitReport:
    """Compute ``job.todo`` for one unit, merge with what is kept, and write the unit's files.

    A clip whose upstream outputs are missing (an upstream file vanished after planning) stays pending,
    never failed, so the next run computes it once the upstream is back."""
    members = set(job.unit.uids)
    outputs = {u: o for u, o in read_outputs(unit_path(job.stage_dir, job.unit, "out.parquet")).items()
               if u in members} if job.reuse else {}
    status = {u: st for u, st in read_status(job.stage_dir, job.unit).items() if u in members} if job.reuse else {}
    for uid in job.unit.uids:
        if uid in job.skipped:
            status[uid] = SampleStatus(SKIPPED, job.skipped[uid])
            outputs.pop(uid, None)
        elif uid not in status:
            status[uid] = SampleStatus(PENDING)
    todo = set(job.todo) - set(job.skipped)
    inputs = _load_inputs(job, todo)
    missing = {u for u in todo if set(inputs[u]) != set(job.upstream_dirs)}
    for uid in missing:
        outputs.pop(uid, None)
        status[uid] = SampleStatus(PENDING, "upstream outputs missing")
    batch_all = [s for s in job.samples if s.uid in todo - missing]
    for start in range(0, len(batch_all), job.batch_size):
        batch = batch_all[start : start + job.batch_size]
        t0 = time.perf_counter()
        results = _process(stage, batch, inputs)
        per_sample = (time.perf_counter() - t0) / len(batch)
        _check(stage, batch, results)
        for res in results:
            bad = _non_finite(res.outputs) if res.ok else None
            if res.ok and bad is None:
                outputs[res.uid] = res.outputs
                status[res.uid] = SampleStatus(OK, None, per_sample)
            else:
                outputs.pop(res.uid, None)
                reason = res.error if bad is None else f"NaN or Inf in the {bad} output computed from this clip"
                status[res.uid] = SampleStatus(FAILED, reason, per_sample)
    sigs, rows = _signatures(job, status, {s.uid for s in batch_all})
    stats = {"stage": stage.name, "cache_key": job.cache_key, "inputs": digest(sorted(sigs.items())),
             "uid_inputs": sigs, "uid_rows": rows, **job.extra_stats}
    written = write_unit(job.stage_dir, job.unit, outputs, status, stats)
    return UnitReport(job.unit.id, len(batch_all), written)

