"""The one constructor of site names agrees with the parser for every site of a model."""

import pytest

import genir_jax as gj
from genir_jax.core.sites import COMPONENTS, SiteError, all_site_names, component_site, parse_site, site_name

CONFIG = gj.t5_v1_1(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)


def test_site_name_round_trips_every_site():
    for name in all_site_names(CONFIG):
        site = parse_site(CONFIG, name)
        assert site_name(site.stack, site.local, site.layer) == name


def test_component_site_and_errors():
    assert COMPONENTS == ("attn", "cross_attn", "mlp")
    assert component_site("decoder", "mlp", 3) == "decoder.3.hook_mlp_out"
    assert site_name("encoder", "hook_embed") == "hook_embed"
    assert site_name("decoder", "final_ln.hook_normalized") == "decoder_final_ln.hook_normalized"
    with pytest.raises(SiteError, match="needs a layer"):
        site_name("decoder", "hook_mlp_out")
    with pytest.raises(SiteError, match="takes no layer"):
        site_name("decoder", "hook_out", 2)
    with pytest.raises(SiteError, match="unknown stack"):  # ("blocks" is the decoder-only models' stack)
        site_name("layers", "hook_mlp_out", 1)
    with pytest.raises(SiteError, match="unknown component"):
        component_site("decoder", "ffn", 1)
