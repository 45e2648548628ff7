"""The stage contract: what a stage declares and the one method the engine calls per batch.

A stage is a class with

* ``name`` and ``version`` (bump the version whenever the code changes its outputs),
* ``needs``: upstream stage names whose outputs it reads (the manifest is always available),
* ``wants``: optional upstream stages: read when they have run in the workspace, left out (and not run by
  ``icf stage <name>``) when they have not (the shard stage and DDESeg's bank: only DDESeg needs the bank),
* ``borrowed_keys(work)``: optionally, the latest keys of other datasets' stages whose outputs it copies
  (``"<dataset>/<stage>"`` → key); they enter its cache key like upstream keys, so a rebuilt source makes
  it stale (``icf status``) and ``icf stage all`` recompute it (MS3's ``--bank-from``),
* ``refusal(dataset)``: optionally, why its config cannot run on that dataset (checked before any work),
* ``uses_model``: True → the Ray runner keeps one long-lived actor per worker, so ``setup()`` (model
  loading) runs once per worker, with a GPU when the cluster has one; False → one Ray task per unit,
* ``clips_per_call``: how many clips (of one unit) the worker hands to one ``process`` call unless
  ``--batch-size`` says otherwise (8; a stage that batches across clips asks for more),
* a ``Config`` dataclass: every field that changes outputs; it is hashed into the cache key together with
  the version and the upstream keys, and each field becomes a ``--flag`` of ``icf stage <name>``,
* ``setup()`` (once per worker), ``process(samples, inputs) -> [Result]`` (never raises for a bad
  sample: it returns ``Result.failed(uid, reason)``), and optionally ``finish(ctx)`` which runs once in the
  driver after every unit is done (dataset-level outputs such as text banks or the final tar shards).
  Most stages only write ``process_one(sample, upstream) -> {name: output}`` and raise ``ValueError``
  naming the file for a bad sample; the default ``process`` turns that into ``Result.failed``.

Adding a stage means adding one module to ``icf/stages/`` that defines a subclass of :class:`Stage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from icf.data.sample import Sample
from icf.pipeline.store import Output

# Per sample, per upstream stage, that stage's outputs: inputs[uid][stage][name].
Inputs = Mapping[str, Mapping[str, Mapping[str, Output]]]


def option(default: Any, help: str) -> Any:
    """A ``Config`` field with its ``--flag`` help text: ``sample_rate: int = option(16000, "...")``."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Result:
    """What ``process`` says about one sample: outputs when ok, a reason naming the file when failed."""

    uid: str
    outputs: dict[str, Output] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def success(cls, uid: str, **outputs: Output) -> "Result":
        return cls(uid, dict(outputs))

    @classmethod
    def failed(cls, uid: str, reason: str) -> "Result":
        return cls(uid, {}, reason)


@dataclass(frozen=True)
class FinishContext:
    """What ``Stage.finish`` may read and where it writes.

    Attributes:
        dataset: ``s4`` | ``ms3`` | ``avss``.
        dataset_dir: ``WORK/<dataset>``.
        stage_dir: ``WORK/<dataset>/<stage>/<cache-key>`` (this stage's outputs).
        cache_key: this stage's key.
        upstream_dirs: upstream stage name → its keyed folder.
        units: unit id → (split, uids that are ok in this stage), in unit order.
    """

    dataset: str
    dataset_dir: Path
    stage_dir: Path
    cache_key: str
    upstream_dirs: Mapping[str, Path]
    units: Mapping[int, tuple[str, tuple[str, ...]]]


class Stage:
    """Base class of every unit stage (see the module docstring for the contract)."""

    name: ClassVar[str]
    version: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    wants: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False
    clips_per_call: ClassVar[int] = 8

    @dataclass(frozen=True)
    class Config:
        """No options."""

    def __init__(self, config: Any = None) -> None:
        self.cfg = config if config is not None else self.Config()

    def config(self) -> dict[str, Any]:
        """Everything that changes the outputs (hashed into the cache key)."""
        return dataclasses.asdict(self.cfg)

    def reads(self, built: Callable[[str], bool]) -> tuple[str, ...]:
        """The upstream stages this run reads: every ``needs``, and each of ``wants`` for which ``built(name)``."""
        return self.needs + tuple(name for name in self.wants if built(name))

    def borrowed_keys(self, work: Path) -> dict[str, str | None]:
        """``"<dataset>/<stage>"`` → that stage's latest cache key in workspace folder ``work`` (None when it
        has not run) for every other dataset's output this stage copies; hashed into the cache key and
        recorded with the upstream keys. Default: none."""
        return {}

    def refusal(self, dataset: str) -> str | None:
        """Why this config cannot run on ``dataset`` (checked before any stage of the run starts), or None."""
        return None

    def stats(self) -> dict[str, Any]:
        """Extra facts recorded in every unit's stats file (e.g. ``weights: random``)."""
        return {}

    def notices(self) -> list[str]:
        """Loud messages shown before the stage runs (e.g. that a tower has random weights)."""
        return []

    def cpu_hint(self) -> str | None:
        """Why this stage is slow without a GPU and the flag that makes a try-out fast, or None (default): shown
        once, with an estimate of the stage's time from its first unit, when it runs where no GPU is."""
        return None

    def setup(self) -> None:
        """Load models or tables; called once per worker before the first ``process``."""

    def process(self, samples: Sequence[Sample], inputs: Inputs) -> list[Result]:
        """One result per sample, same order; a bad sample gives ``Result.failed``, never an exception.

        The default runs :meth:`process_one` on each sample and fails the ones that raise ``ValueError``
        with its message as the reason; stages that batch across samples override this instead.
        """
        results = []
        for s in samples:
            try:
                results.append(Result.success(s.uid, **self.process_one(s, inputs.get(s.uid, {}))))
            except ValueError as err:
                results.append(Result.failed(s.uid, str(err)))
        return results

    def process_one(self, sample: Sample, upstream: Mapping[str, Mapping[str, Output]]) -> dict[str, Output]:
        """Outputs of one sample from its upstream outputs (``upstream[stage][name]``); ``ValueError``
        naming the file when the sample is bad."""
        raise NotImplementedError(f"stage {self.name!r} must implement process_one() or process()")

    def finish(self, ctx: FinishContext) -> dict[str, Any]:
        """Dataset-level work after every unit is done; returns facts for the summary (default: none)."""
        return {}

    @classmethod
    def finish_problem(cls, dataset_dir: Path, cache_key: str) -> str | None:
        """Why the files ``finish`` wrote for ``cache_key`` are not on disk as it left them (deleted,
        truncated, or written since by another key), or None. A problem makes the engine run ``finish``
        again and ``icf status`` show the stage as not done. Must be cheap (sizes, not checksums)."""
        return None
