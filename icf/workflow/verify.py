"""``icf verify``: read every file of a dataset's cache in full and say which ones are damaged.

Checks the manifest and its stats, every unit file (stats, status and output tables) of each stage's
latest key, each stage's ``finish.json`` and dataset-level outputs, and every shard against
``shards.json`` (size, sha256, sample count). Nothing is written; the next ``icf stage all`` repairs
what is reported (damaged units are recomputed, damaged shards rebuilt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from icf.clitools import UserError
from icf.data.shard_check import shard_problem
from icf.data.shards import ShardSet
from icf.pipeline.engine import manifest_units
from icf.pipeline.ledger import Workspace, unit_path
from icf.pipeline.stage import Stage
from icf.pipeline.store import read_json, read_parquet
from icf.stages import stage_classes


@dataclass
class Report:
    """Files checked and the problems found (each names its file)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self, fn, *args) -> None:
        """Run one check; a ``UserError`` (or a returned message) is a problem."""
        self.checked += 1
        try:
            problem = fn(*args)
        except (UserError, FileNotFoundError) as err:
            problem = str(err)
        if problem:
            self.problems.append(str(problem))


def _read_all(path) -> None:
    if path.suffix == ".json":
        if read_json(path) is None:
            raise FileNotFoundError(f"{path}: missing file")
    else:
        read_parquet(path)


def verify_dataset(ws: Workspace) -> Report:
    """Every check of the module docstring for ``ws.dataset``; ``UserError`` when the dataset has no
    workspace at all (neither a manifest nor its stats: nothing was ever staged there)."""
    if not ws.manifest.exists() and not ws.manifest_stats.exists():
        raise ws.no_manifest()
    report = Report()
    report.check(_read_all, ws.manifest_stats)
    report.check(_read_all, ws.manifest)
    if report.problems:
        return report
    view = manifest_units(ws)
    for name, cls in stage_classes().items():
        current = ws.current(name)
        if current is None:
            continue
        folder = ws.stage_dir(name, current["cache_key"])
        for unit in view.units:
            for kind in ("stats.json", "status.parquet", "out.parquet"):
                report.check(_read_all, unit_path(folder, unit, kind))
        if cls.finish is not Stage.finish:
            report.check(_read_all, folder / "finish.json")
            report.check(cls.finish_problem, ws.root, current["cache_key"])
    if (ws.root / "shards.json").is_file():
        try:
            shards = ShardSet.load(ws.root / "shards.json")
        except UserError as err:
            report.problems.append(str(err))
            return report
        for entries in shards.splits.values():
            for entry in entries:
                report.check(shard_problem, entry)
    return report
