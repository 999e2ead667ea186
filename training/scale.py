"""The memory's output scale, chosen on validation wordings after training (`--memory-scale auto`).

Blocks trained with the next-token loss on every token of a few documents come out *loud*: their output
(M_down's columns) is tuned so that the documents' own continuation wins, and on a prompt in another
wording (``City: Essen\\nCountry:``) they push the documents' phrasing (`` Essen. Local time in Essen``)
over the anchor's own reading of the prompt, or a neighbouring entity's fact over the right one. Scaling
every block's output by one factor s < 1 -- the same as LoRA's alpha at inference -- keeps the fact and
gives the anchor back its format. The factor is chosen as a gate's thresholds are, on data that is neither
trained nor tested: the corpus's ``valid`` probes (trained facts asked in a third family of wordings), each
scored greedily through its fact's path (exact match, `training.scoring.greedy_correct`) for every s of
a grid. The best s wins, ties going to the larger one (the trained scale is 1). It is folded into the
exported blocks (slot 2, M_down), so the bank serves it with no new knob. A corpus without ``valid``
probes keeps 1.0. The generic memory gets its own factor by the same rule (it is the control: each memory
at its best on validation data).

The first `docs` build with it (docs/training.md): ``valid`` 78.4% at s = 1, 83.9% at s = 0.6.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

log = logging.getLogger(__name__)

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DOWN = 2  # slot of M_down in a block (L_mem, 3, r, d): scaling it scales the block's output


def scaled(block: torch.Tensor, s: float) -> torch.Tensor:
    """A copy of `block` whose output is `s` times the original's (its M_down scaled)."""
    out = block.detach().clone()
    out[:, DOWN] *= s
    return out


class _ScaledSource:
    """`BlockSource`-like view of a trainer's blocks with the output scaled by `s`."""

    def __init__(self, get_block: Callable[[int, int], torch.Tensor], s: float) -> None:
        self.get_block, self.s = get_block, s
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def block(self, key) -> torch.Tensor:
        k = (int(key[0]), int(key[1]))
        if k not in self.cache:
            self.cache[k] = scaled(self.get_block(*k), self.s)
        return self.cache[k]


def choose_scale(accuracy: dict[float, float]) -> float:
    """The factor with the best validation accuracy; ties go to the larger factor (closer to as trained)."""
    best = max(accuracy.values())
    return max(s for s, a in accuracy.items() if a == best)


def calibrate_memory_scale(model, tokenizer, probes: Sequence, paths: Sequence[Sequence[int]], layers: list[int],
                           get_block: Callable[[int, int], torch.Tensor], generic: torch.Tensor | None,
                           grid: Sequence[float] = GRID, progress: bool = False) -> dict:
    """Validation exact match of the tree's blocks and of the generic memory at each scale of `grid`.

    Args:
        probes: the ``valid`` probes (`training.corpus.Probe`), `paths` the path of each one's fact.
        get_block: (level, index) -> the trained block.
    Returns ``{"scale", "generic_scale", "n", "accuracy": {s: acc}, "generic_accuracy": {...}, "seconds"}``
    (accuracies as fractions); the caller runs it under its compute dtype's autocast.
    """
    from training.prefix import prefix_hidden
    from training.scoring import greedy_correct, prepare_items

    t0 = time.perf_counter()
    l0 = min(layers)
    items = prepare_items(tokenizer, list(probes), paths)
    with torch.no_grad():
        hidden = prefix_hidden(model, [it.ids for it in items], l0, progress=False)
    acc: dict[float, float] = {}
    gacc: dict[float, float] = {}
    from training.progress import task

    with task("output scale", len(grid), "scale", enabled=progress) as bar:
        for s in grid:
            c, _ = greedy_correct(model, tokenizer, items, hidden, l0, "hierarchical",
                                  {"hierarchical": _ScaledSource(get_block, s)}, layers)
            acc[float(s)] = float(c.mean())
            if generic is not None:
                c, _ = greedy_correct(model, tokenizer, items, hidden, l0, "generic", {"generic": scaled(generic, s)},
                                      layers)
                gacc[float(s)] = float(c.mean())
            bar.update()
    s, gs, seconds = choose_scale(acc), choose_scale(gacc) if gacc else 1.0, round(time.perf_counter() - t0, 1)
    log.info("memory scale %.2f (valid %.1f%% vs %.1f%% at 1.0), generic %.2f, on %d valid probes in %.0fs",
             s, 100 * acc[s], 100 * acc.get(1.0, float("nan")), gs, len(items), seconds)
    return {"scale": s, "generic_scale": gs, "n": len(items), "accuracy": acc, "generic_accuracy": gacc,
            "seconds": seconds}


def given_scale(text: str) -> float:
    """The number `--memory-scale` gives (a positive one; "auto" is handled by the caller)."""
    try:
        s = float(text)
    except ValueError:
        s = float("nan")
    if not s > 0:
        raise ValueError(f"--memory-scale must be auto or a positive number, not {text!r}")
    return s


def job_memory_scale(setting: str, *, subtree: int | None, docs: Sequence[dict], probes: Sequence,
                     doc_paths: Sequence[Sequence[int]], model, tokenizer, layers: list[int],
                     get_block: Callable[[int, int], torch.Tensor], generic: torch.Tensor | None,
                     autocast: Callable[[], AbstractContextManager], progress: bool = False) -> dict:
    """The output scales a training job folds into its saved blocks: `setting` (``--memory-scale``) when it is a
    number; with "auto", chosen on the corpus's ``valid`` probes through their facts' paths (`doc_paths`: the
    path of each of `docs`), 1.0 for a subtree job, whose blocks are merged with others', and for a corpus
    without valid probes. `generic`: the generic memory, when one was trained."""
    if setting != "auto":
        s = given_scale(setting)
        return {"scale": s, "generic_scale": s, "source": "--memory-scale"}
    index = {d["id"]: i for i, d in enumerate(docs)}
    valid = [p for p in probes if p.split == "valid" and p.doc_ids and p.doc_ids[0] in index]
    if subtree is not None or not valid:
        return {"scale": 1.0, "generic_scale": 1.0,
                "source": "subtree job" if subtree is not None else "no valid probes"}
    with autocast():
        out = calibrate_memory_scale(model, tokenizer, valid, [doc_paths[index[p.doc_ids[0]]] for p in valid],
                                     layers, get_block, generic, progress=progress)
    return {**out, "source": "valid probes"}
