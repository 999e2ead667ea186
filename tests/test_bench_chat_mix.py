"""bench/chat_mix.py: the distillation mix is chosen on the validation replies' good share."""

from __future__ import annotations

from bench.chat_mix import choose, good_share


def _report(trained: tuple[int, float], free: tuple[int, float], general: float = 1.0) -> dict:
    def fam(n: int, good: float) -> dict:
        return {"n": n, "systems": {"auto": {"good": good}}}

    return {"families": {"trained": fam(*trained), "free": fam(*free), "general": fam(10, general)}}


def test_the_good_share_weighs_the_scored_families_by_their_sizes_and_leaves_general_prompts_aside():
    assert good_share(_report((30, 1.0), (10, 0.0), general=0.0)) == 0.75


def test_the_weight_with_most_good_replies_wins_and_a_tie_goes_to_the_cheaper_one():
    assert choose({0.0: _report((10, 0.5), (10, 0.5)), 1.0: _report((10, 0.9), (10, 0.5))}) == 1.0
    assert choose({0.0: _report((10, 0.7), (10, 0.5)), 3.0: _report((10, 0.5), (10, 0.7))}) == 0.0
