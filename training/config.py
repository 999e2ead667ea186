"""Training settings (no torch import here: the CLI builds its parser from this module).

`TrainConfig` is a pydantic-settings class so that `hiermem train`'s flags come from its fields through
base/settings_cli.py, as every other command's do: one flag per field (`batch_size` -> `--batch-size`,
booleans as `--x` / `--no-x`), the help from the field's docstring. Unlike a service's settings it reads no
environment variables: its only sources are the flags and the values it is constructed with.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, CliToggleFlag, PydanticBaseSettingsSource, SettingsConfigDict

from base.settings_cli import add_settings_flags, settings_from_args


class TrainConfig(BaseSettings):
    """What `hiermem train` does. The defaults are the best settings measured on documents as users write them
    (the `docs` preset's corpus, chosen on its `valid` wordings, never on its test probes; the rounds and their
    figures: docs/training.md, "Documents as users write them"): memory in every 4th layer, 4 documents per
    step at lr 2e-2, the loss without the subject's name, no derived preservation prompts."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True)

    corpus: str = ""
    """corpus directory (docs.jsonl [+ probes.jsonl])"""
    out: str = ""
    """job directory: tree, routes, checkpoint, trained memories (and the bank unless --subtree)"""
    bank: str | None = None
    """where to export the bank (unset: OUT/bank; a subtree job exports nothing, see `train merge`)"""
    anchor: str = "smollm2"
    """frozen anchor: smollm2 | tiny | HF Llama directory"""
    embedder: str = "all-MiniLM-L6-v2"
    """memory_store embedder for routing (recorded in the bank spec); "hash-trigram" for fast tests"""
    routing: Literal["docs", "tree"] = "docs"
    """"docs": group documents that share a name into one leaf and route prompts through the nearest trained
    documents with a calibrated gate (memory_store.router); "tree": the tree's greedy descent, ungated"""
    gate_max_false_open: float = 0.02
    """gate calibration: the largest share of validation prompts outside the corpus that may get memory"""
    branching: list[int] = [8, 8]
    """children per node at each level of the tree, e.g. 8,8 or 16x16"""
    ranks: list[int] = [64, 32]
    """memory units per level, e.g. 64,32"""
    memory_layers: list[int] | None = None
    """anchor layer indices with memory, e.g. 26,27 (unset: --mem-layers, else every --memory-stride-th layer)"""
    mem_layers: int | None = None
    """memory in the anchor's last N layers (unset: every --memory-stride-th layer)"""
    memory_stride: int = 4
    """without --memory-layers / --mem-layers: memory in layers S, 2S, ... below the anchor's depth (4 on the
    30-layer SmolLM2: 4, 8, ..., 28); an anchor shallower than S gets its last layer"""
    epochs: int = 10
    """passes over the training sequences"""
    batch_size: int = 4
    """documents per step; a step's documents share one leaf (packed by leaf)"""
    lr: float = 2e-2
    """AdamW learning rate of the memories"""
    level_lr: list[float] | None = None
    """per-level multipliers of lr for the tree's blocks, e.g. 1,3 (unset: 1 for every level): a leaf's
    block is updated only on the steps that train its few documents, a level-1 block on every step of its
    subtree, so the leaves get far fewer AdamW updates"""
    weight_decay: float = 1e-3
    """AdamW weight decay"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    warmup_steps: int = 5
    """linear warm-up steps of the learning rate, then cosine decay"""
    min_lr_ratio: float = 0.1
    """cosine decay to lr * min_lr_ratio"""
    generic_prob: float = 1.0
    """chance that a step also trains the generic memory on its documents (1.0: the same-epochs control;
    0: none is trained, and the bank has no generic memory)"""
    permuted_views: int = 0
    """extra training views of each document with its sentences in another order (seeded; same path); routing
    and preservation keep the documents (0 = off)"""
    pronoun_views: bool = False
    """also train each document once with its later sentences' opening name made "It" (same path; the answer
    read from the name further back, as key-value and question prompts need); routing keeps the documents"""
    shared_prob: float = 0.0
    """chance that a training row's path also carries a shared block (the generic's size) trained with every
    path and dropped at export: it can absorb what all documents share, their phrasing, so the paths' blocks
    learn the rest (0 = off)"""
    loss: Literal["all", "continuation", "surprising"] = "all"
    """"all": next-token loss on every token; "continuation": only on tokens after a document's route_text
    (the fact's object in the built-in corpus), which skips most of the LM head's work; "surprising": only
    on the positions the frozen anchor predicts worst (--surprising-fraction)"""
    surprising_fraction: float = 0.3
    """with --loss surprising: the share of each document's positions (those the frozen anchor predicts
    worst) the loss covers"""
    skip_name_targets: bool = True
    """the loss leaves out the tokens of the document's subject name (every mention; the subject as
    `training.views.subject_names` finds it): where the name is first mentioned it is a guess, later a
    copy, and trained as a target it teaches the blocks to put the name forward wherever a prompt's answer
    should come (`Place: Mbala\\nNation:` answered ` Mbala`)"""
    name_anaphors: bool = False
    """train on each document with a later sentence's opening "It" / "The <noun>" replaced by the document's
    name (training/views.py: name_anaphors); routing keeps the original text"""
    preserve_weight: float = 1.0
    """weight of KL(anchor || anchor + memory) at the end of the corpus's preserve prompts (frozen anchor;
    0 = off)"""
    preserve_batch: int = 8
    """preservation prompts per step"""
    preserve_per_doc: int = 0
    """without a preserve file: entity-swapped openings derived per document (training/preservation.py); 0 by
    default, as the calibrated gate keeps other prompts off the memory and they cost recall"""
    distill_weight: float = 0.0
    """weight of the context-distillation KL (training/distill.py): the blocks without the document match
    the frozen anchor with the document in context, on chat turns and text prefixes about the document's
    subject (0 = off)"""
    distill_batch: int = 8
    """distillation rows per step (of the step's documents first)"""
    distill_tokens: int = 24
    """tokens of the teacher's greedy continuation the student is held to"""
    memory_scale: str = "auto"
    """output scale folded into the exported blocks: "auto" = chosen on the corpus's ``valid`` probes after
    training (training/scale.py; 1.0 when it has none), or a number, e.g. 0.6"""
    seed: int = 0
    """seed of the tree, the blocks' initialisation, the batch order and every sampling"""
    subtree: int | None = None
    """train only level-1 subtree I (an independent job; merge jobs with `hiermem train merge`)"""
    tree: str | None = None
    """reuse this tree.safetensors instead of building one (subtree jobs must share one tree)"""
    train_anchor: bool = False
    """co-train the anchor with the memories (no prefix cache then)"""
    init_anchor: str | None = None
    """JSON file of ModelConfig fields: pretrain a new anchor from scratch together with its memories"""
    anchor_lr: float = 1e-3
    """learning rate of the anchor with --train-anchor / --init-anchor"""
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float32"
    """bank dtype on export (int8: each row quantized with its own scale, memory_store/quant.py)"""
    threads: str = "auto"
    """torch threads: "auto" = the cores not busy with other work at start (lm.dtype.pick_threads), at least 1;
    a number; or "keep" (leave torch's setting alone)"""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """training matmuls: "auto" (bfloat16 autocast where a short measurement shows it clearly faster, see
    lm/dtype.py), "float32" or "bfloat16" """
    shards: int = 1
    """bank shards on export"""
    checkpoint_every: int = 200
    """steps between checkpoints (and one at every epoch end)"""
    # one flag, --no-prefix-cache (a --x / --no-x pair would read it as the negation of --prefix-cache)
    no_prefix_cache: CliToggleFlag[bool] = False
    """run every step through the whole anchor (for checks; slower)"""
    max_docs: int = 0
    """use at most this many documents (0 = all)"""
    progress: bool = True
    """progress bars (--no-progress: none)"""

    @field_validator("branching", "ranks", "memory_layers", mode="before")
    @classmethod
    def _int_list(cls, value: Any) -> Any:
        """"8,8" or "16x16" (also as a flag's values, ["16x16"]) as [16, 16]; lists of numbers as they are."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            out: list[Any] = []
            for v in value:
                out += [x.strip() for x in v.replace("x", ",").split(",") if x.strip()] if isinstance(v, str) else [v]
            return out
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The values given (and the flags, which pydantic-settings puts first): no environment variables."""
        return (init_settings,)

    def memory_layers_of(self, n_layers: int) -> list[int]:
        """The anchor layers with memory, for an anchor of `n_layers`: `memory_layers`, else the last
        `mem_layers`, else every `memory_stride`-th layer."""
        if self.memory_layers is not None:
            return list(self.memory_layers)
        if self.mem_layers is not None:
            return list(range(n_layers - min(self.mem_layers, n_layers), n_layers))
        return list(range(self.memory_stride, n_layers, max(1, self.memory_stride))) or [n_layers - 1]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The settings from arguments parsed by a parser prepared with `add_train_flags`."""
        return settings_from_args(cls, args)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


_ENV_NOTE = re.compile(r"\s*\[env: [^\]]*\]")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field on `parser` (base/settings_cli.py). The helper notes each flag's
    environment variable, which TrainConfig does not read: those notes are taken out of the help."""
    add_settings_flags(parser, TrainConfig)
    for action in parser._actions:
        if action.help:
            action.help = _ENV_NOTE.sub("", action.help)
