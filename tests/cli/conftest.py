"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def dsi_root(tmp_path_factory, t5_tokenizer):
    """The folder of a tiny random DSI checkpoint (dsi/; `tests.dsi_fixtures.DIMS`, docids `DOC_IDS`), val.json
    of its five `QUERIES` and correct.json listing all five; one per test module."""
    import genir_jax as gj
    from tests.dsi_fixtures import DIMS, DOC_IDS, QUERIES, write_queries
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("interrupt")
    directory, _ = HFCheckpointFactory(root)("base", tokenizer=t5_tokenizer, **DIMS)
    gj.save_pretrained(root / "dsi", gj.add_docid_tokens(gj.load_pretrained(directory), DOC_IDS))
    write_queries(root, QUERIES, DOC_IDS, range(5))
    return root
