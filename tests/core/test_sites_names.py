"""The one constructor of site names agrees with the parser for every site of a model."""

import pytest

import genir_jax as gj
from genir_jax.core.decoder_config import DecoderConfig, gpt2_config
from genir_jax.core.sites import (
    ALL_LAYERS, COMPONENTS, SiteError, all_site_names, component_site, components, expand_site_patterns, layer_sites,
    num_layers, parse_site, site_name, site_shape, stacks,
)

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


DECODER = DecoderConfig(vocab_size=64, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=24)


def test_decoder_only_sites_use_transformer_lens_names_and_round_trip():
    names = all_site_names(DECODER)
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    for local in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                  "attn.hook_z", "attn.hook_pattern", "attn.hook_attn_scores", "hook_attn_out", "mlp.hook_pre",
                  "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out"):
        assert f"blocks.2.{local}" in names
    assert not any("cross_attn" in name or name.startswith(("encoder", "decoder")) for name in names)
    for name in names:
        site = parse_site(DECODER, name)
        assert site_name(site.stack, site.local, site.layer) == name
    assert "blocks.0.mlp.hook_pre_linear" not in all_site_names(gpt2_config(vocab_size=64, d_model=16, num_layers=1,
                                                                            num_heads=2, d_ff=32))


def test_decoder_only_components_shapes_and_errors():
    assert components(DECODER) == ("attn", "mlp") and components(CONFIG) == COMPONENTS
    assert stacks(DECODER) == ("blocks",) and stacks(CONFIG) == ("encoder", "decoder")
    assert component_site("blocks", "mlp", 1) == "blocks.1.hook_mlp_out"
    assert site_name("blocks", "final_ln.hook_normalized") == "ln_final.hook_normalized"
    assert site_shape(DECODER, parse_site(DECODER, "blocks.0.attn.hook_k"), 5, 5) == (5, 2, 4)  # key/value heads
    assert site_shape(DECODER, parse_site(DECODER, "blocks.0.attn.hook_z"), 5, 5) == (5, 4, 4)
    with pytest.raises(SiteError, match="unknown component 'cross_attn'; expected one of attn, mlp"):
        component_site("blocks", "cross_attn", 0)
    with pytest.raises(SiteError, match="does not exist in the 'blocks' stack"):
        site_name("blocks", "hook_out")
    with pytest.raises(SiteError, match="layer 3 does not exist; the blocks has 3 layers"):
        parse_site(DECODER, "blocks.3.hook_mlp_out")
    with pytest.raises(SiteError, match="unknown site 'decoder.0.hook_mlp_out'; did you mean 'blocks.0.hook_mlp_out'"):
        parse_site(DECODER, "decoder.0.hook_mlp_out")
    with pytest.raises(SiteError, match="unknown site 'blocks.0.hook_mlp_out'"):
        parse_site(CONFIG, "blocks.0.hook_mlp_out")


@pytest.mark.parametrize("config", [CONFIG, DECODER], ids=["t5", "decoder-only"])
def test_all_layers_pattern_expands_to_the_per_layer_names(config):
    """``site_name(stack, local, ALL_LAYERS)`` is the pattern of exactly the names `site_name` builds per layer."""
    for stack in stacks(config):
        for local in layer_sites(config, stack):
            pattern = site_name(stack, local, ALL_LAYERS)
            assert pattern == f"{stack}.*.{local}"
            per_layer = [site_name(stack, local, layer) for layer in range(num_layers(config, stack))]
            assert expand_site_patterns(config, [pattern]) == per_layer
    last = stacks(config)[-1]  # `components` are those of the last stack's layers
    for component in components(config):
        assert (expand_site_patterns(config, [component_site(last, component, ALL_LAYERS)])
                == [component_site(last, component, layer) for layer in range(num_layers(config, last))])


def test_all_layers_pattern_errors():
    with pytest.raises(SiteError, match="takes no layer"):
        site_name("encoder", "hook_out", ALL_LAYERS)
    with pytest.raises(SiteError, match="expected a layer number or ALL_LAYERS"):
        site_name("decoder", "hook_mlp_out", "2")
