"""Calibration and the accuracy search on a real Ray cluster (onnxq.search.distributed).

A two-node cluster (ray.cluster_utils.Cluster: two raylets on this machine, 2 logical CPUs
each) is started once for the module. Every check compares against the single-process
run: statistics files and written models byte for byte, search results step for step.
"""

from __future__ import annotations

import _thread
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import ray
from conftest import CHANNELS, IMAGE, bias, feeds_for, make_model, save, tensor, weight, write_npz_folder
from onnx import helper
from test_auto import outlier_calibration, outlier_classifier

import onnxq.search.distributed
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, calibrate_only, quantize
from onnxq.errors import EXIT_BAD_DATA, OnnxqError, UsageError
from onnxq.passes.prepare import prepare_model
from onnxq.quant.ir import import_graph
from onnxq.quant.placement import tensors_to_observe, value_aliases
from onnxq.quant.statistics import Statistics
from onnxq.runtime.calibrate import collect_statistics
from onnxq.runtime.data import SampleSource, model_input_specs, open_source
from onnxq.search import auto
from onnxq.search.distributed import (
    RayOptions,
    ShardResult,
    _check_reachable,
    collect_statistics_on_ray,
    connect,
    fold_shard,
    merge_shards,
    shards,
)
from onnxq.search.sensitivity import Target


def conv_stack_model(layers: int = 4, seed: int = 21) -> onnx.ModelProto:
    """Conv -> Relu repeated: several int8 layers for the search to rank."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], {}, "x"
    for i in range(layers):
        inputs = 3 if i == 0 else CHANNELS
        inits[f"w{i}"] = weight(rng, (CHANNELS, inputs, 3, 3))
        inits[f"b{i}"] = bias(rng, CHANNELS)
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current = f"r{i}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine; the tests' own process is connected as a driver."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 1024**2})
    nodes.add_node(num_cpus=2, object_store_memory=80 * 1024**2)
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray")
    save(conv_stack_model(), root / "m.onnx")
    write_npz_folder(root / "calib", feeds_for(conv_stack_model()), 23)
    return root


def prepared(path: Path) -> tuple[onnx.ModelProto, list[str], dict[str, str], SampleSource]:
    model = prepare_model(onnx.load(path)).model
    tensors = tensors_to_observe(import_graph(model))
    source = open_source(path.parent / "calib", model_input_specs(onnx.load(path)))
    return model, tensors, value_aliases(import_graph(model), tensors), source


# ---------------------------------------------------------------- without a cluster


@pytest.mark.parametrize(("samples", "count", "batch", "most"),
                         [(23, 1, 1, 99), (23, 3, 1, 99), (23, 50, 1, 99), (23, 4, 4, 99), (5, 3, 2, 99), (23, 2, 1, 4),
                          (23, 1, 2, 3)])
def test_shards_are_contiguous_and_start_on_batch_boundaries(samples: int, count: int, batch: int, most: int) -> None:
    parts = shards(samples, count, batch, most)
    batches = -(-samples // batch)
    assert [p.index for p in parts] == list(range(len(parts)))
    assert parts[0].start == 0 and parts[-1].stop == samples
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
    assert all(p.start % batch == 0 and p.stop > p.start and -(-(p.stop - p.start) // batch) <= most for p in parts)
    assert len(parts) == min(batches, max(count, -(-batches // most)))


def test_shards_merge_byte_identical_in_any_order(work: Path) -> None:
    model, tensors, aliases, source = prepared(work / "m.onnx")
    single = collect_statistics(model, tensors, source, aliases=aliases)
    single.save(work / "single.npz")
    parts = [fold_shard(model.SerializeToString(), source, shard, tensors, 1, 2**31, aliases, 1)
             for shard in shards(len(source), 5)]
    for seed in range(4):
        shuffled = random.Random(seed).sample(parts, len(parts))
        merge_shards(shuffled, len(source), source.description, 1).save(work / "merged.npz")
        assert (work / "merged.npz").read_bytes() == (work / "single.npz").read_bytes()


def test_sums_of_batch_extremes_merge_as_one_pass_adds_them_where_a_plain_merge_rounds() -> None:
    batches = [np.array([1.0], np.float32), np.array([3e20], np.float32), np.array([-3e20], np.float32)]
    one_pass = Statistics(keep_batch_extremes=True)
    for batch in batches:
        one_pass.update("t", batch)
    first, second = Statistics(keep_batch_extremes=True), Statistics(keep_batch_extremes=True)
    first.update("t", batches[0])
    for batch in batches[1:]:
        second.update("t", batch)
    parts = [ShardResult(1, second, [1, 1]), ShardResult(0, first, [1])]
    merged = merge_shards(parts, 3, "", 1).tensors["t"]
    assert (merged.sum_batch_max, merged.sum_batch_min) == (one_pass.tensors["t"].sum_batch_max, 0.0)
    assert merged.sum_batch_max == 0.0  # (1 + 3e20) - 3e20: the 1 is lost, as in one pass
    assert first.merge(second).tensors["t"].sum_batch_max == 1.0  # 1 + (3e20 - 3e20): not what one pass gives


def test_batches_that_would_split_differently_are_refused() -> None:
    def part(index: int, sizes: list[int]) -> ShardResult:
        stats = Statistics(keep_batch_extremes=True)
        for size in sizes:
            stats.update("t", np.ones(size, np.float32))
        return ShardResult(index, stats, sizes)

    assert merge_shards([part(0, [4, 4]), part(1, [4, 1])], 13, "", 4).tensors["t"].batches == 4
    with pytest.raises(UsageError, match="--batch-size 1"):  # a shape change cut shard 0's second batch short
        merge_shards([part(0, [4, 2, 2]), part(1, [4, 1])], 13, "", 4)


def test_without_ray_installed_the_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(UsageError) as error:
        connect(RayOptions())
    assert error.value.message == "--ray needs Ray: pip install 'onnxq[ray]'"


def test_an_address_nobody_answers_at_fails_at_once() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UsageError, match=f"cannot reach Ray at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    with pytest.raises(UsageError, match="HOST:PORT"):
        _check_reachable("no-port-here")


# ---------------------------------------------------------------- on the cluster


@pytest.mark.usefixtures("cluster")
def test_calibration_on_ray_is_byte_identical_for_1_2_and_3_workers(work: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(ray.nodes()) == 2
    calibrate_only(work / "m.onnx", work / "local.npz", DataOptions(calib=work / "calib"))
    for workers, most in ((1, None), (2, None), (3, None), (2, 4)):  # 4: six shards of at most 4 samples
        if most:
            monkeypatch.setattr(onnxq.search.distributed, "MAX_SHARD_BATCHES", most)
        out = work / f"ray{workers}-{most}.npz"
        calibrate_only(work / "m.onnx", out, DataOptions(calib=work / "calib", ray=RayOptions(workers=workers)))
        assert out.read_bytes() == (work / "local.npz").read_bytes(), f"{workers} workers"


@pytest.mark.usefixtures("cluster")
def test_quantize_and_accuracy_search_on_ray_equal_the_serial_run(work: Path) -> None:
    def run(name: str, options: RayOptions | None) -> dict:
        request = QuantizeRequest(model=work / "m.onnx", output=work / f"{name}.onnx",
                                  data=DataOptions(calib=work / "calib", ray=options),
                                  target=Target(min_sqnr_db=35.0), speed_guard="off")
        return quantize(request).report

    serial, parallel = run("serial", None), run("parallel", RayOptions(workers=3))
    assert (work / "parallel.onnx").read_bytes() == (work / "serial.onnx").read_bytes()
    timed = ("speed",)  # the chosen model's latency, timed afterwards on this machine
    assert {k: v for k, v in parallel["accuracy_target"].items() if k not in timed} == {
        k: v for k, v in serial["accuracy_target"].items() if k not in timed}
    assert serial["accuracy_target"]["met"] and len(serial["accuracy_target"]["steps"]) > 1  # fallbacks were tried



@pytest.mark.parametrize(("model", "target", "scored"), [
    ("classifier", auto.TARGET_AGREEMENT, {"static global", "static percentile"}),
    ("classifier", 1.01, {"static percentile", "static global, MatMul/Gemm/LSTM dynamic", "dynamic",  # the
                          "static global, 1 most damaged layer float"}),  # run-time group, the fallback ladder
    ("conv stack", 1.01, {"static percentile", "static global + bias correction",  # repairs, the ladder
                          "static global + AdaRound on 4 layers", "static global, 2 most damaged layers float"}),
])  # 1.01: a target nothing reaches, so every group runs
@pytest.mark.usefixtures("cluster")
def test_the_automatic_search_on_ray_equals_the_serial_run(tmp_path: Path, model: str, target: float,
                                                           scored: set[str]) -> None:
    if model == "classifier":
        save(outlier_classifier(), tmp_path / "m.onnx")
        calib = outlier_calibration(tmp_path / "calib")
    else:
        save(conv_stack_model(), tmp_path / "m.onnx")
        calib = write_npz_folder(tmp_path / "calib", feeds_for(conv_stack_model()), 23)

    def run(name: str, options: RayOptions | None) -> dict:
        request = QuantizeRequest(model=tmp_path / "m.onnx", output=tmp_path / f"{name}.onnx",
                                  data=DataOptions(calib=calib, ray=options), search=True, auto_target=target,
                                  budget_s=1e9, speed_guard="off")  # a budget every candidate fits in
        return quantize(request).report["auto"]

    serial, parallel = run("serial", None), run("parallel", RayOptions(workers=3))
    assert (tmp_path / "parallel.onnx").read_bytes() == (tmp_path / "serial.onnx").read_bytes()
    assert (serial["scored_on"], parallel["scored_on"]) == ("this process", "Ray, at most 3 tasks at once")
    untimed = [{k: v for k, v in c.items() if k != "seconds"} for c in serial["candidates"]]
    assert [{k: v for k, v in c.items() if k != "seconds"} for c in parallel["candidates"]] == untimed
    timed = ("seconds", "scored_on", "candidates", "measured")
    assert {k: v for k, v in parallel.items() if k not in timed} == {k: v for k, v in serial.items() if k not in timed}
    assert scored <= {c["name"] for c in serial["candidates"]}


@pytest.mark.auto_search
def test_quantize_with_ray_runs_the_automatic_search_there(cluster, tmp_path: Path) -> None:
    save(outlier_classifier(), tmp_path / "m.onnx")
    calib = outlier_calibration(tmp_path / "calib")
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(tmp_path / "m.onnx"), "-o", str(out),
                             "--calib", str(calib), "--ray", cluster.address, "--workers", "2", "--report",
                             str(report), "--speed-guard", "off"],  # the amx table keeps such tiny MatMuls float
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    search = json.loads(report.read_text())["auto"]
    assert search["scored_on"] == "Ray, at most 2 tasks at once" and len(search["candidates"]) > 1
    assert "s (on Ray, at most 2 tasks at once): " in result.stderr  # the summary
    assert out.exists()


@pytest.mark.usefixtures("cluster")
def test_a_search_task_that_keeps_dying_fails_with_one_line_naming_the_candidate() -> None:
    from onnxq.search.distributed import RayScorer

    class DyingReference:  # defined here: Ray ships it by value (workers cannot import the tests)
        def fidelity_of(self, _model: onnx.ModelProto) -> None:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies, on every retry

    space = auto.SearchSpace(build=lambda _c: conv_stack_model(), int8_layers={}, dynamic_layers=frozenset(),
                             methods=("global",), speed=lambda _c: 2.0, rank_layers=list,
                             adaround_layers=frozenset)
    with pytest.raises(OnnxqError) as error:
        auto.search(space, DyingReference(), scorer=RayScorer(DyingReference(), RayOptions(workers=2)))
    assert error.value.message.startswith("candidate 1 of 1 (static global): the Ray task failed 4 times")
    assert len(error.value.message.splitlines()) == 1


@pytest.mark.usefixtures("cluster")
def test_a_search_candidate_over_2_gb_is_refused_on_ray_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxq.search.distributed import RayScorer

    scorer = RayScorer(SimpleNamespace(feeds=[]), RayOptions(workers=2))
    monkeypatch.setattr(onnxq.search.distributed, "needs_external_data", lambda model: model.graph.name == "big")
    big = conv_stack_model()
    big.graph.name = "big"
    space = auto.SearchSpace(build=lambda _c: big, int8_layers={}, dynamic_layers=frozenset(), methods=("global",),
                             speed=lambda _c: 2.0, rank_layers=list, adaround_layers=frozenset)
    with pytest.raises(UsageError, match="cannot exceed 2 GB; this model does: quantize it without --ray"):
        auto.search(space, SimpleNamespace(), scorer=scorer)


@pytest.mark.usefixtures("cluster")
def test_a_killed_worker_is_retried(work: Path) -> None:
    model, tensors, aliases, source = prepared(work / "m.onnx")
    marker = work / "killed-once"
    load = source.sample

    def dies_once(index: int) -> dict[str, np.ndarray]:
        if index == 5 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-shard
        return load(index)

    flaky = SampleSource(source.description, len(source), dies_once, source.kind)
    retried = collect_statistics_on_ray(model, tensors, flaky, RayOptions(workers=3), aliases=aliases)
    assert marker.exists()
    retried.save(work / "retried.npz")
    collect_statistics(model, tensors, source, aliases=aliases).save(work / "single-for-retry.npz")
    assert (work / "retried.npz").read_bytes() == (work / "single-for-retry.npz").read_bytes()


def test_an_unreadable_shard_fails_with_one_line_naming_it(cluster, work: Path, tmp_path: Path) -> None:
    bad = tmp_path / "calib"
    write_npz_folder(bad, feeds_for(conv_stack_model()), 9)
    (bad / "s007.npz").write_bytes(b"not a zip file")
    out = tmp_path / "stats.npz"
    result = subprocess.run([sys.executable, "-m", "onnxq", "calibrate", str(work / "m.onnx"), "--calib", str(bad),
                             "-o", str(out), "--ray", cluster.address, "--workers", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BAD_DATA, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxq: error: shard 3 of 3 (samples 6-8): cannot read") and "s007.npz" in lines[0]
    assert not out.exists()


@pytest.mark.usefixtures("cluster")
def test_ctrl_c_cancels_the_tasks(work: Path) -> None:
    model, tensors, aliases, source = prepared(work / "m.onnx")
    progress = work / "ctrl-c"
    progress.mkdir()
    load = source.sample

    def slow(index: int) -> dict[str, np.ndarray]:
        (progress / f"{index}").touch()
        time.sleep(0.3)
        return load(index)

    slow_source = SampleSource(source.description, len(source), slow, source.kind)
    ctrl_c_once_started(progress, lambda: collect_statistics_on_ray(model, tensors, slow_source,
                                                                     RayOptions(workers=2), aliases=aliases))
    time.sleep(2.0)  # a cancelled task reads no further samples: 23 samples at 0.3 s would take 3.5 s a shard
    seen = len(list(progress.iterdir()))
    time.sleep(2.0)
    assert len(list(progress.iterdir())) == seen < len(source)
    assert_all_cpus_free()


def test_a_second_ctrl_c_does_not_stop_the_cancelling() -> None:
    cancelled: list[str] = []
    presses = iter([True, False, True, False, False])  # Ctrl-C lands in the 1st and 3rd cancel calls

    class PressedRay:
        def cancel(self, ref: str, force: bool) -> None:
            assert force
            if next(presses):
                raise KeyboardInterrupt
            cancelled.append(ref)

    onnxq.search.distributed.cancel_all(PressedRay(), ["a", "b", "c"])
    assert cancelled == ["c", "b", "a"]


@pytest.mark.usefixtures("cluster")
def test_ctrl_c_cancels_the_search_tasks(tmp_path: Path) -> None:
    from onnxq.search.distributed import RayScorer

    started, finished = tmp_path / "started", tmp_path / "finished"
    started.mkdir()
    finished.mkdir()

    class SlowReference:  # defined here: Ray ships it by value
        def fidelity_of(self, _model: onnx.ModelProto) -> SimpleNamespace:
            name = f"{os.getpid()}-{time.monotonic()}"
            (started / name).touch()
            time.sleep(2.0)
            (finished / name).touch()
            return SimpleNamespace(agreement=0.5, decided_agreement=0.5, outputs=[])

    space = auto.SearchSpace(build=lambda _c: conv_stack_model(), int8_layers={}, dynamic_layers=frozenset(),
                             methods=("global", "percentile"), speed=lambda _c: 2.0, rank_layers=list,
                             adaround_layers=frozenset)
    scorer = RayScorer(SlowReference(), RayOptions(workers=2))
    ctrl_c_once_started(started, lambda: auto.search(space, SlowReference(), scorer=scorer))
    time.sleep(2.5)  # a task that was not cancelled would have finished by now
    assert any(started.iterdir()) and not any(finished.iterdir())
    assert_all_cpus_free()


def ctrl_c_once_started(started: Path, call: Callable[[], object]) -> None:
    """Press Ctrl-C once a file appears in `started`, as a command-line process gets it, and check that `call`
    ends with KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # another test's library may have replaced it
    stop = threading.Event()

    def press() -> None:  # again every 0.2 s: one landing in Ray's own code may be swallowed
        while not any(started.iterdir()):
            time.sleep(0.05)
        while not stop.is_set():
            _thread.interrupt_main()
            stop.wait(0.2)

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        _swallow_late_presses()
        stop.set()
        presser.join()
        time.sleep(0.05)  # a press already on its way runs the empty handler now, not in a later test
        signal.signal(signal.SIGINT, previous)


def _swallow_late_presses() -> None:
    """An empty SIGINT handler: a press the thread sent just before it stopped would otherwise reach pytest
    itself after this test (a KeyboardInterrupt that ended `make test` once)."""
    while True:
        try:
            signal.signal(signal.SIGINT, lambda *_: None)
            return
        except KeyboardInterrupt:  # one more press landed first
            continue


def assert_all_cpus_free() -> None:
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4
