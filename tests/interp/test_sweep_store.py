"""The resume store of a sweep (`genir_jax.interp.sweep_store`): a chunk that cannot be read back is
recomputed with a warning, never trusted and never a traceback."""

import numpy as np
import pytest

from genir_jax.interp.sweep_store import DirectoryStore


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_chunk_is_recomputed_with_a_warning(tmp_path, damage):
    store = DirectoryStore(tmp_path / "s", {"checkpoint": "x"})
    arrays = {"rank": np.arange(4000, dtype=np.int32), "logit": np.linspace(0, 1, 4000, dtype=np.float32)}
    store.put("0", arrays)
    store.put("1", arrays)
    path = tmp_path / "s" / "chunks" / "1.npz"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"PK\x03\x04" + b"\x00" * 64,
                      "empty": b""}[damage])
    reopened = DirectoryStore(tmp_path / "s", {"checkpoint": "x"})
    np.testing.assert_array_equal(reopened.get("0")["rank"], arrays["rank"])
    with pytest.warns(UserWarning, match=r"1\.npz: unreadable sweep chunk .*recomputing it"):
        assert reopened.get("1") is None
    reopened.put("1", arrays)  # the recomputed chunk replaces it
    np.testing.assert_array_equal(reopened.get("1")["logit"], arrays["logit"])
