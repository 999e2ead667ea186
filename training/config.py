"""Training settings (no torch import here: the CLI builds its parser from this module)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    """What `hiermem train` does. Defaults are the paper's post-hoc memory settings scaled to this CPU."""

    corpus: str = ""
    """corpus directory (docs.jsonl [+ probes.jsonl])"""
    out: str = ""
    """job directory: tree, routes, checkpoint, trained memories (and the bank unless --subtree)"""
    bank: str | None = None
    """where to export the bank (default OUT/bank; a subtree job exports nothing, see `train merge`)"""
    anchor: str = "smollm2"
    """frozen anchor: smollm2 | tiny | HF Llama directory"""
    embedder: str = "all-MiniLM-L6-v2"
    """memory_store embedder for routing (recorded in the bank spec); "hash-trigram" for fast tests"""
    routing: str = "docs"
    """"docs": group documents that share a name into one leaf and route prompts through the nearest trained
    documents with a calibrated gate (memory_store.router); "tree": the tree's greedy descent, ungated"""
    gate_max_false_open: float = 0.02
    """gate calibration: the largest share of validation prompts outside the corpus that may get memory"""
    branching: list[int] = field(default_factory=lambda: [8, 8])
    ranks: list[int] = field(default_factory=lambda: [64, 32])
    memory_layers: list[int] | None = None
    """anchor layers with memory (default: the last `mem_layers`)"""
    mem_layers: int = 4
    epochs: int = 10
    batch_size: int = 16
    """documents per step; a step's documents share one leaf (packed by leaf)"""
    lr: float = 3e-3
    level_lr: list[float] | None = None
    """per-level multipliers of lr for the tree's blocks, e.g. [1, 3] (default 1 for every level): a leaf's
    block is updated only on the steps that train its few documents, a level-1 block on every step of its
    subtree, so the leaves get far fewer AdamW updates"""
    weight_decay: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """cosine decay to lr * min_lr_ratio"""
    generic_prob: float = 1.0
    """chance that a step also trains the generic memory on its documents (1.0: the same-epochs control;
    0: none is trained, and the bank has no generic memory)"""
    permuted_views: int = 0
    """extra training views of each document with its sentences in another order (seeded; same path); routing
    and preservation keep the documents"""
    pronoun_views: bool = False
    """also train each document once with its later sentences' opening name made "It" (same path; the answer
    read from the name further back, as key-value and question prompts need); routing keeps the documents"""
    shared_prob: float = 0.0
    """chance that a training row's path also carries a shared block (the generic's size) trained with every
    path and dropped at export: it can absorb what all documents share, their phrasing, so the paths' blocks
    learn the rest (0 = off)"""
    loss: str = "all"
    surprising_fraction: float = 0.3
    """with --loss surprising: the share of each document's positions (those the frozen anchor predicts
    worst) the loss covers"""
    """"all": next-token loss on every token; "continuation": only on tokens after a document's route_text
    (the fact's object in the built-in corpus), which skips most of the LM head's work"""
    skip_name_targets: bool = False
    """the loss leaves out the tokens of the document's subject name (every mention; the subject as
    `training.preservation.subject_names` finds it): where the name is first mentioned it is a guess, later a
    copy, and trained as a target it teaches the blocks to put the name forward wherever a prompt's answer
    should come (`Place: Mbala\nNation:` -> ` Mbala`)"""
    name_anaphors: bool = False
    """train on each document with a later sentence's opening "It" / "The <noun>" replaced by the document's
    name (training/preservation.py: name_anaphors); routing keeps the original text"""
    preserve_weight: float = 0.0
    """weight of KL(anchor || anchor + memory) at the end of the corpus's preserve prompts (frozen anchor)"""
    preserve_batch: int = 16
    preserve_per_doc: int = 1
    """without a preserve file: entity-swapped openings derived per document (training/preservation.py)"""
    memory_scale: str = "auto"
    """output scale folded into the exported blocks: "auto" = chosen on the corpus's ``valid`` probes after
    training (training/scale.py; 1.0 when it has none), or a number"""
    seed: int = 0
    subtree: int | None = None
    """train only level-1 subtree I (an independent job; merge jobs with `hiermem train merge`)"""
    tree: str | None = None
    """reuse this tree.safetensors instead of building one (subtree jobs must share one tree)"""
    train_anchor: bool = False
    """co-train the anchor with the memories (no prefix cache then)"""
    init_anchor: str | None = None
    """JSON ModelConfig fields: pretrain a new anchor from scratch together with its memories"""
    anchor_lr: float = 1e-3
    dtype: str = "float32"
    """bank dtype on export"""
    threads: str = "auto"
    """torch threads: "auto" = the cores not busy with other work (1-minute load), at least 1; a number; or
    "keep" (leave torch's setting alone)"""
    compute_dtype: str = "auto"
    """training matmuls: "auto" (bfloat16 autocast where a short measurement shows it clearly faster, see
    lm/dtype.py), "float32" or "bfloat16" """
    shards: int = 1
    checkpoint_every: int = 200
    """steps between checkpoints (and one at every epoch end)"""
    no_prefix_cache: bool = False
    """run every step through the whole anchor (for checks; slower)"""
    max_docs: int = 0
    """use at most this many documents (0 = all)"""
    progress: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).replace("x", ",").split(",") if x.strip()]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--corpus", help="corpus directory (docs.jsonl)")
    p.add_argument("--out", help="job directory")
    p.add_argument("--bank", help="bank directory to export (default OUT/bank)")
    p.add_argument("--anchor", default=d.anchor)
    p.add_argument("--embedder", default=d.embedder, help="routing embedder (memory_store name)")
    p.add_argument("--routing", default=d.routing, choices=["docs", "tree"],
                   help="docs: nearest-document routing with a gate; tree: greedy descent")
    p.add_argument("--gate-max-false-open", type=float, default=d.gate_max_false_open)
    p.add_argument("--branching", type=_ints, default=d.branching, help="e.g. 8,8 or 16x16")
    p.add_argument("--ranks", type=_ints, default=d.ranks, help="memory units per level, e.g. 64,32")
    p.add_argument("--memory-layers", type=_ints, default=None, help="anchor layer indices (default: last N)")
    p.add_argument("--mem-layers", type=int, default=d.mem_layers, help="N for the default memory layers")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--level-lr", type=lambda t: [float(x) for x in t.split(",")], default=None,
                   help="per-level lr multipliers for the tree's blocks, e.g. 1,3")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--generic-prob", type=float, default=d.generic_prob)
    p.add_argument("--permuted-views", type=int, default=d.permuted_views,
                   help="extra training views per document with its sentences reordered (0 = off)")
    p.add_argument("--pronoun-views", action="store_true", default=None,
                   help="also train each document with its later sentences' opening name made \"It\"")
    p.add_argument("--shared-prob", type=float, default=d.shared_prob,
                   help="chance a training row's path also carries a training-only shared block (0 = off)")
    p.add_argument("--loss", default=d.loss, choices=["all", "continuation", "surprising"])
    p.add_argument("--surprising-fraction", type=float, default=d.surprising_fraction)
    p.add_argument("--skip-name-targets", action="store_true", default=None,
                   help="leave the document's subject name (every mention) out of the loss")
    p.add_argument("--name-anaphors", action="store_true", default=None,
                   help="train on documents with sentence-opening pronouns replaced by the document's name")
    p.add_argument("--preserve-weight", type=float, default=d.preserve_weight,
                   help="keep the anchor's prediction on the corpus's preserve prompts (0 = off)")
    p.add_argument("--preserve-batch", type=int, default=d.preserve_batch)
    p.add_argument("--preserve-per-doc", type=int, default=d.preserve_per_doc,
                   help="without preserve.jsonl: derived prompts per document")
    p.add_argument("--memory-scale", default=d.memory_scale,
                   help="auto (chosen on the corpus's valid probes after training) or a number, e.g. 0.6")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--subtree", type=int, default=None, help="train only this level-1 subtree")
    p.add_argument("--tree", default=None, help="reuse this tree.safetensors")
    p.add_argument("--train-anchor", action="store_true", help="co-train the anchor with the memories")
    p.add_argument("--init-anchor", default=None, metavar="CONFIG",
                   help="JSON file of ModelConfig fields: pretrain a new anchor from scratch with memories")
    p.add_argument("--anchor-lr", type=float, default=d.anchor_lr)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", default=d.threads, help="torch threads: auto | N | keep")
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--shards", type=int, default=d.shards)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
