"""The engine on toy stages: planner, cache keys, ledger, atomic writes, reruns, --force/--only/--retry-failed,
and the Ray runners (tasks, actors, worker death, two simulated nodes)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from icf.clitools import UserError
from icf.stages.index import MANIFEST_SCHEMA, write_manifest
from icf.data.sample import Sample
from icf.pipeline.engine import RunOptions, run_stage
from icf.pipeline.ledger import Workspace, read_stats, read_status
from icf.pipeline.plan import assign_units, cache_key, group_units
from icf.pipeline.stage import Result, Stage
from icf.pipeline.store import TMP_INFIX, atomic_write, npz_bytes, read_outputs, write_outputs
from icf.stages.index import with_units

QUIET = Console(file=open(os.devnull, "w"))
FLAKY: set[str] = set()  # uids the toy stage fails while listed (local executor only)


class Toy(Stage):
    """x = uid-seeded vector * scale; uids starting 'bad' fail, 'nan' yields NaN."""

    name = "toy"
    version = "1"

    @dataclass(frozen=True)
    class Config:
        scale: int = 1

    def process(self, samples, inputs):
        out = []
        for s in samples:
            if s.uid.startswith("bad") or s.uid in FLAKY:
                out.append(Result.failed(s.uid, f"{s.audio_path}: broken on purpose"))
                continue
            x = np.random.default_rng(sum(map(ord, s.uid))).normal(size=4).astype(np.float16) * self.cfg.scale
            if s.uid.startswith("nan"):
                x[0] = np.nan
            out.append(Result.success(s.uid, x=x))
        return out


class Double(Stage):
    """y = 2 x (reads the toy stage's outputs)."""

    name = "double"
    version = "1"
    needs = ("toy",)

    def process(self, samples, inputs):
        return [Result.success(s.uid, y=inputs[s.uid]["toy"]["x"] * 2) for s in samples]


class ModelToy(Toy):
    """A model stage: setup() happens once per actor; outputs record the loading process."""

    name = "modeltoy"
    uses_model = True

    def setup(self):
        self.loaded_in = os.getpid()

    def process(self, samples, inputs):
        return [Result.success(s.uid, loaded=np.array(self.loaded_in), pid=np.array(os.getpid())) for s in samples]


class DiesOnce(Toy):
    """Ends its worker process the first time it sees a unit holding 'c03' (a marker file holding the pid makes
    it once), ``how``: ``os._exit(1)``, ``sys.exit(3)`` or SIGKILL."""

    name = "diesonce"

    @dataclass(frozen=True)
    class Config:
        marker: str = ""
        how: str = "_exit"

    def process(self, samples, inputs):
        if any(s.uid == "c03" for s in samples) and not Path(self.cfg.marker).exists():
            Path(self.cfg.marker).write_text(str(os.getpid()))
            if self.cfg.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.cfg.how == "exit":
                sys.exit(3)
            os._exit(1)
        return [Result.success(s.uid, x=np.array([len(s.uid)], np.float32)) for s in samples]


class ModelDiesOnce(DiesOnce):
    """`DiesOnce` as a model stage: its actor dies, Ray restarts it and resends the unit."""

    name = "modeldiesonce"
    uses_model = True


class WhereAmI(Stage):
    """Records the Ray node each sample ran on (multi-node test)."""

    name = "where"
    version = "1"

    def process(self, samples, inputs):
        import ray

        node = ray.get_runtime_context().get_node_id().encode()
        time.sleep(0.05)  # long enough that both single-CPU nodes get work
        return [Result.success(s.uid, node=node, x=np.array([len(s.uid)], np.float32)) for s in samples]


UIDS = [f"c{i:02d}" for i in range(12)] + ["bad1", "nan1"]


def make_ws(tmp: Path, uids=UIDS, unit_size=3, index_failed=()) -> Workspace:
    """A workspace whose manifest is written directly (the toy stages read no media)."""
    ws = Workspace(tmp / "work", "s4")
    rows = []
    for i, uid in enumerate(uids):
        s = Sample(uid, "s4", ("train", "val", "test")[i % 3], "s4", ("f.png",), ("",), (False,),
                   f"/data/{uid}.wav", (), 1)
        bad = uid in index_failed
        rows.append({**s.to_row(), "status": "failed" if bad else "ok", "error": "missing frame" if bad else ""})
    write_manifest(with_units(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), unit_size), ws.manifest)
    ws.manifest_stats.write_text('{"cache_key": "idx0", "config": {}, "config_key": "c"}')
    return ws


def run(ws, stage, upstream_keys=None, **kw):
    kw.setdefault("executor", "local")
    return run_stage(ws, stage, RunOptions(progress=False, **kw), QUIET, upstream_keys)


def unit_files(ws, stage, key):
    """Every unit file's bytes, except the status tables' timing column (uid, status, error are kept)."""
    files = {}
    for p in sorted(ws.stage_dir(stage, key).glob("unit-*")):
        files[p.name] = pq.read_table(p).drop(["duration_s"]) if p.name.endswith(".status.parquet") else p.read_bytes()
    return files


# ---------------------------------------------------------------------------------------------- planner

def test_units_are_stable_dense_and_per_split():
    uids = [f"id{i}" for i in range(200)]
    splits = ["train"] * 120 + ["test"] * 80
    a = assign_units(uids, splits, unit_size=16)
    perm = np.random.default_rng(0).permutation(200)
    b = assign_units([uids[i] for i in perm], [splits[i] for i in perm], unit_size=16)
    assert [a[i] for i in perm] == b  # order of rows does not matter
    assert sorted(set(a)) == list(range(8 + 5))  # ceil(120/16) + ceil(80/16), train first
    assert all(u < 8 for u in a[:120]) and all(u >= 8 for u in a[120:])
    sizes = np.bincount(a)
    assert sizes.min() >= 4 and sizes.max() <= 32  # roughly unit_size each
    units = group_units({"uid": u, "split": s, "unit": k} for u, s, k in zip(uids, splits, a))
    assert [u.id for u in units] == sorted(set(a)) and all(list(u.uids) == sorted(u.uids) for u in units)


def test_cache_key_depends_on_version_config_and_upstream():
    base = cache_key("mel", "1", {"n_mels": 64}, {"index": "a"})
    assert base == cache_key("mel", "1", {"n_mels": 64}, {"index": "a"})
    assert base != cache_key("mel", "2", {"n_mels": 64}, {"index": "a"})
    assert base != cache_key("mel", "1", {"n_mels": 32}, {"index": "a"})
    assert base != cache_key("mel", "1", {"n_mels": 64}, {"index": "b"})


# ------------------------------------------------------------------------------------------- storage

def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_outputs_roundtrip_arrays_and_bytes(tmp_path):
    outs = {"b": {"x": np.arange(6, dtype=np.float16).reshape(2, 3), "j": b"\xff\xd8jpeg"}, "a": {"x": np.ones(1)}}
    write_outputs(tmp_path / "o.parquet", outs)
    back = read_outputs(tmp_path / "o.parquet")
    assert back["b"]["j"] == b"\xff\xd8jpeg" and back["b"]["x"].dtype == np.float16
    np.testing.assert_array_equal(back["b"]["x"], outs["b"]["x"])
    assert list(read_outputs(tmp_path / "o.parquet", {"a"})) == ["a"]


def test_npz_bytes_are_deterministic(tmp_path):
    arrays = {"b": np.arange(3), "a": np.eye(2, dtype=np.float16)}
    assert npz_bytes(arrays) == npz_bytes(dict(reversed(arrays.items())))
    (tmp_path / "t.npz").write_bytes(npz_bytes(arrays))
    with np.load(tmp_path / "t.npz") as z:
        np.testing.assert_array_equal(z["a"], arrays["a"])


# ------------------------------------------------------------------------------------------ the engine

def test_stage_records_every_sample_and_keeps_failures_out_of_outputs(tmp_path):
    ws = make_ws(tmp_path, index_failed=("c05",))
    s = run(ws, Toy())
    assert s.counts == {"ok": 11, "failed": 2, "skipped": 1}
    reasons = dict(s.failures)
    assert reasons["bad1"] == "/data/bad1.wav: broken on purpose"
    assert "NaN or Inf in the x output" in reasons["nan1"]
    units = group_units(ws.read_manifest().to_pylist())
    folder = ws.stage_dir("toy", s.cache_key)
    status, outputs = {}, {}
    for u in units:
        assert read_stats(folder, u)["cache_key"] == s.cache_key
        status.update(read_status(folder, u))
        outputs.update(read_outputs(folder / f"{u.stem}.out.parquet"))
    assert set(status) == set(UIDS)
    assert status["c05"].status == "skipped" and status["c05"].error == "index: missing frame"
    assert set(outputs) == set(UIDS) - {"bad1", "nan1", "c05"}
    # every processed sample records the time it took; one that never ran (skipped) records none
    assert all(st.duration_s > 0 for u, st in status.items() if st.status in ("ok", "failed")), status
    assert status["c05"].duration_s == 0.0
    table = pq.read_table(folder / f"{units[0].stem}.status.parquet")
    assert table.column_names == ["uid", "status", "error", "duration_s"]


class Crashy(Stage):
    """Breaks the contract: process() raises for uids starting 'bad' (e.g. a decoder bug on a corrupt file)."""

    name = "crashy"
    version = "1"

    def process_one(self, sample, upstream):
        if sample.uid.startswith("bad"):
            raise RuntimeError("decoder exploded\nsecond line")
        return {"x": np.array([len(sample.uid)], np.float32)}


def test_a_sample_that_raises_is_failed_and_the_rest_of_its_batch_survives(tmp_path):
    ws = make_ws(tmp_path, unit_size=14)
    s = run(ws, Crashy(), batch_size=14)  # one unit, one batch holding the bad sample
    assert s.counts == {"ok": 13, "failed": 1}
    assert dict(s.failures) == {"bad1": "crashy raised RuntimeError: decoder exploded"}


def test_noop_rerun_computes_nothing_and_rewrites_nothing(tmp_path):
    ws = make_ws(tmp_path)
    first = run(ws, Toy())
    folder = ws.stage_dir("toy", first.cache_key)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    current = ws.stage_root("toy") / "current.json"
    current_mtime = current.stat().st_mtime_ns
    second = run(ws, Toy())
    assert (second.computed, second.units_run) == (0, 0) and second.cache_key == first.cache_key
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert current.stat().st_mtime_ns == current_mtime
    assert second.counts == first.counts


def test_noop_rerun_on_ray_does_not_start_ray(tmp_path, monkeypatch):
    """Ray is joined only when a unit must run, so a rerun with nothing to do costs only planning."""
    import icf.pipeline.runners as runners

    ws = make_ws(tmp_path)
    run(ws, Toy())

    def refuse(address):
        raise AssertionError("Ray was started for a no-op rerun")

    monkeypatch.setattr(runners, "connect", refuse)
    assert run(ws, Toy(), executor="ray").units_run == 0
    with pytest.raises(AssertionError, match="no-op"):
        run(ws, Toy(), executor="ray", force=True)  # the probe does fire when there is work


def test_config_change_recomputes_stage_and_downstream_not_upstream(tmp_path):
    ws = make_ws(tmp_path)
    toy1, dbl1 = run(ws, Toy()), run(ws, Double())
    assert dbl1.counts == {"ok": 12, "skipped": 2}  # bad1 / nan1 failed upstream
    toy2 = run(ws, Toy(Toy.Config(scale=3)))
    assert toy2.cache_key != toy1.cache_key and toy2.computed == 14
    dbl2 = run(ws, Double())
    assert dbl2.cache_key != dbl1.cache_key and dbl2.computed == 12
    again = run(ws, Toy(Toy.Config(scale=3)))
    assert again.computed == 0  # upstream untouched by the downstream rerun
    u = group_units(ws.read_manifest().to_pylist())[0]
    y1 = read_outputs(ws.stage_dir("double", dbl1.cache_key) / f"{u.stem}.out.parquet")
    y2 = read_outputs(ws.stage_dir("double", dbl2.cache_key) / f"{u.stem}.out.parquet")
    uid = next(iter(y1))
    np.testing.assert_array_equal(y2[uid]["y"], y1[uid]["y"] * 3)


def test_downstream_refuses_an_incomplete_upstream(tmp_path):
    ws = make_ws(tmp_path)
    with pytest.raises(UserError, match="needs 'toy'"):
        run(ws, Double())
    run(ws, Toy(), only=frozenset({"c00"}))
    with pytest.raises(UserError, match="'toy' is not complete"):
        run(ws, Double())


def test_force_only_and_retry_failed(tmp_path):
    ws = make_ws(tmp_path)
    FLAKY.update({"c01", "c02"})
    try:
        first = run(ws, Toy())
    finally:
        FLAKY.clear()
    assert first.counts["failed"] == 4
    retry = run(ws, Toy(), retry_failed=True)
    assert retry.computed == 4 and retry.counts == {"ok": 12, "failed": 2}  # bad1 / nan1 stay failed
    only = run(ws, Toy(), only=frozenset({"c03", "c07"}))
    assert only.computed == 2 and only.units_run <= 2
    forced = run(ws, Toy(), force=True)
    assert forced.computed == 14 and forced.counts == retry.counts


def test_only_names_unknown_ids(tmp_path):
    with pytest.raises(UserError, match="not in the s4 manifest: nope"):
        run(make_ws(tmp_path), Toy(), only=frozenset({"c00", "nope"}))


def test_only_on_a_fresh_stage_leaves_the_rest_pending_then_completes(tmp_path):
    ws = make_ws(tmp_path)
    part = run(ws, Toy(), only=frozenset({"c00"}))
    assert part.computed == 1 and part.counts["pending"] > 0
    rest = run(ws, Toy())
    assert rest.computed == 13 and "pending" not in {k for k, v in rest.counts.items() if v}


def test_a_unit_without_its_stats_file_is_redone(tmp_path):
    """A run killed after the outputs but before the stats file: that unit (only) is recomputed."""
    ws = make_ws(tmp_path)
    first = run(ws, Toy())
    folder = ws.stage_dir("toy", first.cache_key)
    before = unit_files(ws, "toy", first.cache_key)
    unit = group_units(ws.read_manifest().to_pylist())[1]
    (folder / f"{unit.stem}.stats.json").unlink()
    (folder / f"{unit.stem}.out.parquet{TMP_INFIX}dead").write_bytes(b"half")
    again = run(ws, Toy())
    assert again.units_run == 1 and again.computed == len(unit.uids)
    assert unit_files(ws, "toy", first.cache_key) == before  # same bytes, temp file swept


def test_upstream_retry_makes_downstream_redo_that_unit(tmp_path):
    ws = make_ws(tmp_path)
    FLAKY.add("c04")
    try:
        run(ws, Toy())
    finally:
        FLAKY.clear()
    d1 = run(ws, Double())
    assert d1.counts["skipped"] == 3
    run(ws, Toy(), retry_failed=True)
    d2 = run(ws, Double())
    assert d2.cache_key == d1.cache_key and d2.units_run == 1 and d2.counts["skipped"] == 2


# ------------------------------------------------------------------------------------------------ Ray

@pytest.fixture(scope="session")
def ray_cluster():
    """One simulated two-node Ray cluster (1 CPU each) shared by every Ray test of this module."""
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # toy stages live in this test module
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_units_spread_over_two_nodes(tmp_path, ray_cluster):
    ws = make_ws(tmp_path, uids=[f"u{i:02d}" for i in range(24)], unit_size=2)
    s = run(ws, WhereAmI(), executor="ray")
    folder = ws.stage_dir("where", s.cache_key)
    nodes = set()
    for u in group_units(ws.read_manifest().to_pylist()):
        nodes |= {o["node"] for o in read_outputs(folder / f"{u.stem}.out.parquet").values()}
    assert len(nodes) == 2


def test_ray_tasks_write_the_same_units_as_local(tmp_path, ray_cluster):
    local_ws, ray_ws = make_ws(tmp_path / "l"), make_ws(tmp_path / "r")
    a, b = run(local_ws, Toy()), run(ray_ws, Toy(), executor="ray")
    assert a.cache_key == b.cache_key and a.counts == b.counts
    assert unit_files(local_ws, "toy", a.cache_key) == unit_files(ray_ws, "toy", b.cache_key)
    d_local, d_ray = run(local_ws, Double()), run(ray_ws, Double(), executor="ray")
    assert unit_files(local_ws, "double", d_local.cache_key) == unit_files(ray_ws, "double", d_ray.cache_key)


def _one_restart(s, marker, said):
    """Every clip done once, and the one death reported with its cause and the dead worker's pid."""
    assert marker.exists()  # a worker really died
    assert s.counts == {"ok": 14} and s.computed == 14 and s.resent == 1  # the resent unit is counted once
    assert [(r["pid"], r["cause"]) for r in s.restarts] == [(int(marker.read_text()), said)]
    assert s.line().endswith(f"; 1 worker restart (1 unit resent): {said} (pid {marker.read_text()})")
    doc = json.loads(json.dumps(s.to_dict()))  # what --json prints
    assert doc["units_resent"] == 1 and doc["restarts"][0]["cause"] == said
    assert doc["restarts"][0]["exit_type"] == "SYSTEM_ERROR"


@pytest.mark.parametrize("how, said", [("_exit", "ended abruptly: SIGKILL, a crash or os._exit"),
                                       ("exit", "exited with code 3")])
def test_ray_task_retry_survives_a_dying_worker_and_says_why(tmp_path, ray_cluster, how, said):
    ws = make_ws(tmp_path)
    marker = tmp_path / "died"
    s = run(ws, DiesOnce(DiesOnce.Config(marker=str(marker), how=how)), executor="ray")
    _one_restart(s, marker, said)
    again = run(ws, DiesOnce(DiesOnce.Config(marker=str(marker), how=how)), executor="ray", force=True)
    assert again.computed == 14 and again.restarts == [] and "restart" not in again.line()


def test_a_killed_actor_is_restarted_its_unit_resent_and_the_kill_reported(tmp_path, ray_cluster):
    ws = make_ws(tmp_path)
    marker = tmp_path / "died"
    s = run(ws, ModelDiesOnce(ModelDiesOnce.Config(marker=str(marker), how="kill")), executor="ray", workers=2)
    _one_restart(s, marker, "ended abruptly: SIGKILL, a crash or os._exit")


def test_a_worker_dying_more_often_than_ray_retries_is_named_in_the_error(tmp_path, ray_cluster, monkeypatch):
    import ray

    import icf.pipeline.engine as engine
    from icf.pipeline.runners import RayRunner

    monkeypatch.setattr(engine, "make_runner", lambda *args: RayRunner(max_retries=0))
    marker = tmp_path / "died"
    with pytest.raises(ray.exceptions.RayError) as caught:
        run(make_ws(tmp_path), DiesOnce(DiesOnce.Config(marker=str(marker), how="exit")), executor="ray")
    assert caught.value.__notes__ == [f"while the stage ran: 1 worker restart: exited with code 3 (pid {marker.read_text()})"]


def test_model_stage_loads_once_per_actor(tmp_path, ray_cluster):
    ws = make_ws(tmp_path)
    s = run(ws, ModelToy(), executor="ray", workers=2, batch_size=2)
    assert s.counts == {"ok": 14}
    folder = ws.stage_dir("modeltoy", s.cache_key)
    outs = {}
    for u in group_units(ws.read_manifest().to_pylist()):
        outs.update(read_outputs(folder / f"{u.stem}.out.parquet"))
    loaded = {int(o["loaded"]) for o in outs.values()}
    assert 1 <= len(loaded) <= 2  # at most one setup per actor, for 5 units
    assert all(int(o["loaded"]) == int(o["pid"]) for o in outs.values())  # processed where it was loaded
    assert os.getpid() not in loaded
    assert s.restarts == [] and s.resent == 0  # the actors ray.kill stops at the end are no restarts


class RefusesWeights(ModelToy):
    """A model stage whose setup() refuses its weights, as the extract stage does for a file that does not fit."""

    name = "refuses"

    def setup(self):
        raise UserError("CLIP weights /x/bad.zip: do not fit ViT-B-32")


def test_a_user_error_in_actor_setup_is_raised_as_itself(tmp_path, ray_cluster):
    """A UserError of an actor's setup() reaches the CLI as that error (one ``error:`` line), not as Ray's
    remote traceback of a dead, restarted actor; nothing is recorded as done."""
    ws = make_ws(tmp_path)
    with pytest.raises(UserError) as caught:
        run(ws, RefusesWeights(), executor="ray", workers=2)
    assert type(caught.value) is UserError and str(caught.value) == "CLIP weights /x/bad.zip: do not fit ViT-B-32"
    assert not list(ws.stage_root("refuses").rglob("*.stats.json"))


def test_two_node_cluster_writes_the_same_shards_as_local(tmp_path, ray_cluster):
    """All four stages on the simulated two-node cluster (tasks + extract actors) vs the local executor."""
    from icf.data.synth import synthesize
    from icf.stages import stage_classes
    from icf.stages.extract import ExtractStage
    from icf.stages.index import run_index

    synthesize("avss", tmp_path / "data", clips=6, seed=5, size=32)
    hashes = {}
    for executor in ("local", "ray"):
        ws = Workspace(tmp_path / executor, "avss")
        run_index(ws, tmp_path / "data", None, 2)
        keys: dict[str, str] = {}
        for name, cls in stage_classes().items():
            stage = cls(ExtractStage.Config(encoders="tiny") if name == "extract" else None)
            summary = run(ws, stage, executor=executor, workers=2, upstream_keys=keys)
            assert summary.counts == {"ok": 6}
            keys[name] = summary.cache_key
        index = json.loads((ws.root / "shards.json").read_text())
        hashes[executor] = {e["url"]: e["sha256"] for v in index["splits"].values() for e in v}
        hashes[executor]["bank"] = hashlib.sha256((ws.root / index["text_bank"]).read_bytes()).hexdigest()
    assert hashes["ray"] == hashes["local"] and len(hashes["ray"]) >= 2  # shards + text bank
