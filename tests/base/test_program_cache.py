"""The program cache: compiled executables on disk give the traced path's results bit for bit, are keyed so
that a changed config, shape or code never reuses one, and an unusable entry falls back to tracing."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import genir_jax
from genir_jax.base import program_cache
from genir_jax.core.config import t5_v1_0
from genir_jax.core.model import forward

CONFIG = t5_v1_0(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=2, num_decoder_layers=3)
STAGES = [[0], [1], [2]]


def _inputs(config=CONFIG, count=5, length=6):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, config.vocab_size, size=(count, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask, rng.integers(0, config.vocab_size, size=count).astype(np.int32)


def _run(config=CONFIG, **inputs):
    """Stage patching (means, clean state, config chunks) and step ranks: every cached program of the path."""
    from genir_jax.analysis.stage_patching import run_stage_patching
    from genir_jax.docids.sequence_targets import teacher_forced_step_ranks

    params = genir_jax.init_params(config, 0)
    ids, mask, targets = _inputs(config, **inputs)
    result = run_stage_patching(config, params, ids, mask, targets, stages=STAGES, modes=("mean", "zero"),
                                progress=False)
    steps = teacher_forced_step_ranks(config, params, ids, mask, targets[:, None], np.ones((len(ids), 1)))
    return result.ranks, result.sweep.clean, steps


def _assert_same(a, b):
    assert np.array_equal(a[0], b[0])  # every configuration's rank of every query
    assert a[1].keys() == b[1].keys() and all(np.array_equal(a[1][m], b[1][m]) for m in a[1])
    assert np.array_equal(a[2], b[2])


@pytest.fixture
def cache_dir(tmp_path):
    program_cache.forget_loaded_programs()
    program_cache.set_program_cache_dir(tmp_path / "programs")
    yield tmp_path / "programs"
    program_cache.set_program_cache_dir(None)
    program_cache.forget_loaded_programs()


class _NoTracing:
    """Stands in for a jitted function: the run must not trace, lower or call it."""

    def lower(self, *args, **kwargs):
        raise AssertionError("traced although the program was cached")

    __call__ = lower


@pytest.mark.slow
def test_loaded_executables_give_the_traced_results(cache_dir, monkeypatch):
    traced = _run_uncached()
    stored = _run()  # compiles through the cache and writes every program
    names = {name.rsplit("-", 1)[0] for name in os.listdir(cache_dir)}
    assert names == {"_batch_sums", "_forward", "clean_state", "config_chunk_step", "step_ranks_program"}
    program_cache.forget_loaded_programs()  # as a new process: read back from disk
    for instance in list(program_cache._instances):
        monkeypatch.setattr(instance, "jitted", _NoTracing())
    loaded = _run()
    _assert_same(traced, stored)
    _assert_same(traced, loaded)


def _run_uncached(config=CONFIG, **inputs):
    directory = program_cache.program_cache_dir()
    program_cache.set_program_cache_dir(None)
    try:
        return _run(config, **inputs)
    finally:
        program_cache.set_program_cache_dir(directory)


@pytest.mark.slow
def test_a_changed_config_or_shape_is_not_served_a_stale_program(cache_dir):
    _run()
    first = set(os.listdir(cache_dir))
    # Same shapes, another static config: its own entries, and its results are its traced ones.
    other = dataclasses.replace(CONFIG, layer_norm_epsilon=0.5)
    program_cache.forget_loaded_programs()
    _assert_same(_run_uncached(other), _run(other))
    second = set(os.listdir(cache_dir))
    assert first < second  # a new entry for every program that reads the config (step ranks do not)
    assert {name.rsplit("-", 1)[0] for name in second - first} == {"_batch_sums", "_forward", "clean_state",
                                                                  "config_chunk_step"}
    # Another query length: new entries again.
    program_cache.forget_loaded_programs()
    _assert_same(_run_uncached(length=7), _run(length=7))
    assert len(set(os.listdir(cache_dir))) > len(second)


@pytest.mark.slow
def test_the_key_covers_code_versions_and_flags(cache_dir, monkeypatch):
    _run()
    count = len(os.listdir(cache_dir))
    program_cache.forget_loaded_programs()
    environment = program_cache._environment()
    monkeypatch.setattr(program_cache, "_environment", lambda: environment.replace(
        program_cache.source_fingerprint(), "another version of the source"))
    _run()
    assert len(os.listdir(cache_dir)) == 2 * count
    program_cache.forget_loaded_programs()
    monkeypatch.setattr(program_cache, "_flags", lambda: "another jax_numpy_rank_promotion")
    _run()
    assert len(os.listdir(cache_dir)) == 3 * count


@pytest.mark.slow
def test_an_unusable_entry_falls_back_to_tracing(cache_dir):
    traced = _run_uncached()
    _run()
    paths = sorted(cache_dir.iterdir())
    good = {path: path.read_bytes() for path in paths}
    for damage in ("truncate", "flip", "garbage", "other key"):
        _damage(good, paths, damage)
        program_cache.forget_loaded_programs()
        _assert_same(traced, _run())
        for path, data in good.items():  # rewritten whole by the fallback
            assert program_cache._load(str(path), _key_of(data)) is not None


def _damage(good: dict, paths: list, damage: str) -> None:
    for path, data in good.items():
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            middle = len(data) // 2
            path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
        elif damage == "garbage":
            path.write_bytes(b"not a program")
        else:  # a well-formed entry of another program under this name
            path.write_bytes(good[paths[0] if path != paths[0] else paths[1]])


def _key_of(data: bytes) -> str:
    import pickle

    return pickle.loads(data[len(program_cache._MAGIC) + 64:])["key"]


def test_calls_inside_a_trace_and_unkeyable_statics_use_plain_jit(cache_dir):
    import jax

    params = genir_jax.init_params(CONFIG, 0)
    ids, mask, _ = _inputs()
    start = np.zeros((len(ids), 1), np.int32)
    outer = jax.jit(lambda p: forward(CONFIG, p, ids, mask, start))
    assert np.array_equal(outer(params), forward(CONFIG, params, ids, mask, start))
    assert len(os.listdir(cache_dir)) == 1  # the eager call's program; traced inside `outer`: plain jit

    class Opaque:
        pass

    assert program_cache._static_text(Opaque()) is None
    assert program_cache._static_text(CONFIG) == repr(CONFIG)


def test_cached_values_are_kept_keyed_and_recomputed_when_damaged(cache_dir):
    calls = []

    def compute(value):
        calls.append(value)
        return {"shape": (3, value)}

    assert program_cache.cached_value("thing", "a", lambda: compute(1)) == {"shape": (3, 1)}
    assert program_cache.cached_value("thing", "a", lambda: compute(2)) == {"shape": (3, 1)}  # read back
    assert program_cache.cached_value("thing", "b", lambda: compute(3)) == {"shape": (3, 3)}  # another key
    assert calls == [1, 3]
    for path in cache_dir.iterdir():
        path.write_bytes(path.read_bytes()[:-3])
    assert program_cache.cached_value("thing", "a", lambda: compute(4)) == {"shape": (3, 4)}
    assert calls == [1, 3, 4]
    program_cache.set_program_cache_dir(None)
    assert program_cache.cached_value("thing", "a", lambda: compute(5)) == {"shape": (3, 5)}


def test_abstract_parameters_come_from_the_cache(cache_dir):
    from genir_jax.core import model

    config = dataclasses.replace(CONFIG, d_ff=24)
    model._abstract_variables.cache_clear()  # an earlier test of this process may have traced this config
    shapes = model.param_shapes(config)
    assert [p.name.split("-")[0] for p in cache_dir.iterdir()] == ["t5_abstract_variables"]
    model._abstract_variables.cache_clear()
    (entry,) = cache_dir.iterdir()
    before = entry.stat()
    assert model.param_shapes(config) == shapes
    after = entry.stat()  # read back, not written again (a write replaces the file: a new inode) ...
    assert after.st_ino == before.st_ino and after.st_size == before.st_size
    assert after.st_mtime_ns >= before.st_mtime_ns  # ... and renewed as recently used


def test_releasing_compiled_programs_drops_the_loaded_executables(cache_dir):
    from genir_jax.paper.reproduce import release_compiled_programs

    double = program_cache.cached_jit(lambda x: x * 2)
    assert np.array_equal(double(x=np.arange(3.0)), [0.0, 2.0, 4.0])
    assert len(double.loaded) == 1 and len(os.listdir(cache_dir)) == 1
    release_compiled_programs()
    assert not double.loaded
    assert np.array_equal(double(x=np.arange(3.0)), [0.0, 2.0, 4.0])  # read back from its file
    assert len(double.loaded) == 1 and len(os.listdir(cache_dir)) == 1


def test_arrays_on_other_devices_have_other_keys():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates them)")
    placed = [jax.device_put(np.ones(4), NamedSharding(Mesh(np.array(group), ("data",)), PartitionSpec("data")))
              for group in (devices[:2], devices[2:4])]
    assert program_cache._leaf_text(placed[0]) != program_cache._leaf_text(placed[1])  # same mesh repr
    assert repr(placed[0].sharding) == repr(placed[1].sharding)


def test_the_directory_is_pruned_least_recently_used_first(cache_dir):
    """Every code change adds entries (the source fingerprint is in every key), so the directory is bounded:
    past its limit the least recently written or read entries go first, down to 80% of the limit."""
    import time

    def store(name, calls):
        return program_cache.cached_value("thing", name, lambda: calls.append(name) or b"x" * 100_000)

    program_cache.set_program_cache_dir(cache_dir, max_bytes=350_000)
    calls = []
    for name in "abc":
        store(name, calls)
    sizes = [path.stat().st_size for path in cache_dir.iterdir()]
    assert len(sizes) == 3 and all(size > 100_000 for size in sizes)
    now = time.time()
    for age, path in zip((300, 200, 100), sorted(cache_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)):
        os.utime(path, (now - age, now - age))  # written in the order a, b, c, long ago
    oldest = {path.name for path in cache_dir.iterdir()}
    assert store("a", calls) == b"x" * 100_000 and calls == ["a", "b", "c"]  # a hit renews a
    store("d", calls)  # 4 entries > 350 kB: the least recently used (b, then c) go, down to 280 kB
    assert len(list(cache_dir.iterdir())) == 2
    store("a", calls)
    assert calls == ["a", "b", "c", "d"]  # a and d are still there
    store("b", calls)
    assert calls == ["a", "b", "c", "d", "b"]  # b was removed: computed again
    assert len(oldest & {path.name for path in cache_dir.iterdir()}) >= 1
    with pytest.raises(ValueError, match="size limit must be positive"):
        program_cache.set_program_cache_dir(cache_dir, max_bytes=0)
