"""`compiling_bar`: a tqdm bar that names the wait for XLA's compilation of the first step."""

from __future__ import annotations

import io

from genir_jax.base.progress import compiling_bar


def test_the_bar_says_compiling_until_the_first_step_is_done():
    stream = io.StringIO()
    seen = []
    bar = compiling_bar(range(3), desc="ranking", file=stream, mininterval=0)
    for _ in bar:
        seen.append(bar.desc)
    frames = stream.getvalue().split("\r")
    assert frames[1].startswith("ranking (compiling):") and "0/3" in frames[1]
    assert all(frame.startswith("ranking:") for frame in frames[2:])
    assert seen[0] == "ranking (compiling)" and seen[-1] == "ranking"


def test_a_bar_updated_by_hand_drops_the_note_at_its_first_update():
    stream = io.StringIO()
    bar = compiling_bar(total=2, desc="patching sweep", file=stream, mininterval=0)
    assert bar.desc == "patching sweep (compiling)"
    bar.update(2)
    bar.close()
    assert bar.desc == "patching sweep" and stream.getvalue().split("\r")[-1].startswith("patching sweep: 100%")
