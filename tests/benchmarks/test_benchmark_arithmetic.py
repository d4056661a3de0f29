"""The arithmetic the speed claims rest on, checked another way: the FLOPs `bench_sweeps` charges the
encoder-cached PyTorch loop against torch's own FLOP counter on the same forward, the ratio bound against its
definition, and the device suite's neuron sample against the grid it samples."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_sweeps  # noqa: E402
import device_suite  # noqa: E402

import genir_jax as gj  # noqa: E402


@pytest.mark.parametrize("gated", [False, True])
def test_torch_encoder_cached_flops_equal_torchs_flop_counter(gated):
    """One config of `torch_baselines.encoder_cached` is a transformers T5 forward from a cached encoder output
    for one decoder token; torch.utils.flop_counter counts its matmuls, which must be what we charge it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    config = (gj.t5_v1_1 if gated else gj.t5_v1_0)(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                     num_decoder_layers=3, num_heads=4, dropout_rate=0.0)
    hf = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                               num_heads=4, dropout_rate=0.0,
                               feed_forward_proj="gated-gelu" if gated else "relu",
                               tie_word_embeddings=not gated)
    hf._attn_implementation = "eager"  # torch's counter does not see inside CPU sdpa; eager attention is matmuls
    model = transformers.T5ForConditionalGeneration(hf).eval()
    queries, s = 5, 7
    ids = torch.randint(3, 96, (queries, s))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        encoded = model.encoder(input_ids=ids, attention_mask=mask)
        counter = FlopCounterMode(display=False)
        with counter:
            model(encoder_outputs=encoded, attention_mask=mask,
                  decoder_input_ids=torch.zeros((queries, 1), dtype=torch.long), use_cache=False)
    assert config.is_gated_act == gated
    assert counter.get_total_flops() == queries * bench_sweeps.torch_encoder_cached_flops(config, s)


def test_the_ratio_bound_is_peak_over_minimum_over_baseline():
    # 200 GFLOP/s, 4 MFLOP per config-query at least: 50,000 cq/s at best; against 1,000 cq/s: 50x
    assert bench_sweeps.exact_ratio_bound(200e9, 4e6, 1000.0) == pytest.approx(50.0)


def test_the_device_suites_neuron_sample():
    config = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=40, num_layers=3, num_heads=4)
    grid, layers = device_suite.sampled_neurons(config, layers=1, stride=8)
    assert list(layers) == [0, 1, 2]
    assert grid.size == 3 * 5  # neurons 0, 8, 16, 24, 32 of each layer
    assert set(np.asarray(grid.labels["neuron"])) == {0, 8, 16, 24, 32}
    assert sorted(set(np.asarray(grid.labels["layer"]))) == [0, 1, 2]
    grid, layers = device_suite.sampled_neurons(config, layers=2, stride=0)
    assert list(layers) == [1, 2] and grid.size == 2 * 40
    assert sorted(set(np.asarray(grid.labels["layer"]))) == [1, 2]


def test_the_transformerlens_script_defines_every_name_it_reads():
    """`bench_sweeps.TL_SCRIPT` runs in TransformerLens' own interpreter, where genir_jax is not importable: every
    name it reads must be a builtin or bound in the script itself (a helper of ours pasted into it once broke
    the TransformerLens timing with a NameError)."""
    import ast
    import builtins

    tree = ast.parse(bench_sweeps.TL_SCRIPT)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    assert read - bound == set()
    assert "genir_jax" not in bench_sweeps.TL_SCRIPT
