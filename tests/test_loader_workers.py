"""make_loader caps its worker processes at the CPUs this process may use (bench/loader.py measured why)."""

from __future__ import annotations

from icf.data import shards
from icf.data.shards import make_loader, usable_cpus


class _Stream(shards.IterableDataset):
    def __iter__(self):
        yield from ({"uid": [str(i)]} for i in range(3))


def test_workers_are_capped_at_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(shards, "usable_cpus", lambda: 2)
    assert make_loader(_Stream(), 8).num_workers == 2
    assert make_loader(_Stream(), 1).num_workers == 1
    assert make_loader(_Stream(), 0).num_workers == 0


def test_usable_cpus_is_positive():
    assert usable_cpus() >= 1
