"""Shared test fixtures: random-weight Hugging Face T5 checkpoints and the shared data directory.

Checkpoints are built with transformers' PyTorch T5 (a test-only dependency), saved to a temp dir and
then loaded through our real loading code. Nothing is fetched from the network.
"""

from __future__ import annotations

import os

# Four simulated CPU devices, so sharded code paths are exercised (must precede the first jax import).
# On 2 busy cores, four simulated devices can wait long at an in-process collective; XLA's CPU runtime
# aborts the whole process when one waits past its terminate timeout, so give it ten minutes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The CLI enables a persistent XLA compilation cache; tests never write to ~/.cache (and never share
# compiled code between runs). tests/cli/test_startup.py turns it on in a temporary directory.
os.environ["GENIR_JAX_CACHE"] = "off"

import gc
import pathlib

import jax
import pytest

from tests.hf_fixtures import HFCheckpointFactory

jax.config.update("jax_numpy_rank_promotion", "raise")  # catch silent broadcasting bugs

try:  # transformers' "Writing model shards" / "Loading weights" bars only clutter test logs
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    pass

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after every test module.

    XLA's CPU backend maps each compiled kernel's code and data as separate pages (three memory mappings a
    kernel), and they stay mapped while the jit caches hold the program. Over the whole suite in one process
    that grew past 30,000 mappings by a fifth of the way and towards Linux's default limit of 65,530
    (vm.max_map_count), where an mmap inside the compiler fails and the process dies with SIGSEGV (CI: exit
    139 at 91%). Clearing the caches between modules keeps the count near one module's worth."""
    yield
    from genir_jax.base.program_cache import forget_loaded_programs

    jax.clear_caches()
    forget_loaded_programs()
    gc.collect()


def _shared_data_dir() -> pathlib.Path:
    configured = os.environ.get("GENIR_JAX_DATA")
    return pathlib.Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data` beside the project (or $GENIR_JAX_DATA); fails loudly when it is missing."""
    path = _shared_data_dir()
    if not (path / "t5-tokenizer").is_dir():
        pytest.fail(
            f"shared data not found at {path} (expected squad-v1.1-dev/, nq-open-oracle/, cranfield/, "
            "t5-tokenizer/). Put the shared data folder beside the project root or set GENIR_JAX_DATA.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def t5_tokenizer(shared_data):
    """The real T5 SentencePiece vocabulary (32100 tokens) as a transformers tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_data / "t5-tokenizer"))


@pytest.fixture
def hf_checkpoint(tmp_path) -> HFCheckpointFactory:
    """Factory: ``hf_checkpoint(name, **config)`` -> (directory, torch model) of a random HF checkpoint."""
    return HFCheckpointFactory(tmp_path)


@pytest.fixture(scope="module")
def dsi(tmp_path_factory, t5_tokenizer):
    """(root, model, t5_dir): a tiny random DSI checkpoint (root/dsi; `tests.dsi_fixtures.DIMS`, docids
    `DOC_IDS`), root/val.json of its five `QUERIES`, root/correct.json of queries 3, 0, 4, 1, and a random
    T5 of the same shape (t5_dir) for source / t5 modes; one per test module."""
    import genir_jax as gj
    from tests.dsi_fixtures import DIMS, DOC_IDS, QUERIES, write_queries

    root = tmp_path_factory.mktemp("dsi")
    factory = HFCheckpointFactory(root)
    directory, _ = factory("base", tokenizer=t5_tokenizer, **DIMS)
    t5_dir, _ = factory("t5", seed=5, **DIMS)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), DOC_IDS)
    gj.save_pretrained(root / "dsi", model)
    write_queries(root, QUERIES, DOC_IDS, (3, 0, 4, 1))
    return root, model, t5_dir


@pytest.fixture(scope="module")
def lens_dsi(tmp_path_factory, t5_tokenizer):
    """(root, model): the logit-lens reading tests' DSI checkpoint (`tests.dsi_fixtures.build_lens_dsi`);
    one per test module."""
    from tests.dsi_fixtures import build_lens_dsi

    root = tmp_path_factory.mktemp("lens_dsi")
    return root, build_lens_dsi(root, t5_tokenizer)
