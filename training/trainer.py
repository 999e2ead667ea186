"""`hiermem train`: memories on a frozen anchor (or co-trained with it), one code path for 1 or N processes.

A job directory (``--out``) holds everything a run needs to resume and to export:

    config.json          the TrainConfig
    tree.safetensors     the cluster tree (built from the documents, or copied from --tree)
    doc_emb.npy          the documents' routing embeddings; doc_paths.npy their routes
    prefix.pt            the prefix cache (frozen anchor only)
    checkpoint.pt        memories + optimizer + schedule + position in the epoch (atomic writes)
    memory.safetensors   the trained blocks ("<level>_<index>") and "generic", when training ended
    anchor/              the trained anchor, with --train-anchor / --init-anchor
    job.json             what export needs: spec fields, anchor identity and where to load it, counts, timings

Under ``torchrun --nproc_per_node N`` every process takes every N-th batch and the memory gradients are
all-reduced (gloo on CPU, nccl on GPUs) before each AdamW step; rank 0 writes checkpoints and the bank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import cast

import numpy as np
import torch

from training.config import TrainConfig
from training.corpus import Corpus
from training.data import (
    MAX_DOC_TOKENS,
    Batch,
    atomic_save,
    leaf_batches,
    loss_starts,
    loss_targets,
    name_target_masks,
    pad_hidden,
    pad_ids,
    prefix_hidden,
    tokenize_docs,
)
from training.distributed import Dist, barrier, init_distributed, sync_gradients
from training.preservation import Preservation, name_anaphors, permuted_views, pronoun_views, subject_names
from training.routing import route_documents
from training.scale import scaled
from training.trainable_bank import TrainableBank

log = logging.getLogger(__name__)

_GENERIC = ("generic",)  # the key of the generic memory among a batch's block keys (paths are (level, node))
_SHARED = ("shared",)  # the training-only shared block (--shared-prob)


# ---- setup --------------------------------------------------------------------------------------------------


def load_model_for(cfg: TrainConfig):
    """(model, tokenizer, anchor name or None when the anchor is new)."""
    from lm import ModelConfig, Transformer, load_anchor

    anchor = load_anchor(cfg.anchor)
    if cfg.init_anchor:
        fields = json.loads(Path(cfg.init_anchor).read_text())
        fields.setdefault("vocab_size", len(anchor.tokenizer))
        fields.setdefault("bos_token_id", anchor.tokenizer.bos_token_id)
        fields.setdefault("eos_token_ids", [anchor.tokenizer.eos_token_id])
        model = Transformer(ModelConfig(**fields)).init_weights(seed=cfg.seed)
        return model, anchor.tokenizer, None
    return anchor.model, anchor.tokenizer, anchor.name if cfg.anchor in ("smollm2", "tiny") else cfg.anchor


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ---- the trainer -------------------------------------------------------------------------------------------


def _given_scale(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = float("nan")
    if not s > 0:
        raise ValueError(f"--memory-scale must be auto or a positive number, not {text!r}")
    return s


class Trainer:
    """Holds the model, the memories, the data and the optimizer of one job (one process of it)."""

    def __init__(self, cfg: TrainConfig, dist: Dist | None = None):
        self.cfg = cfg
        if cfg.memory_scale != "auto":
            _given_scale(cfg.memory_scale)  # a bad value fails now, not after training
        self.dist = dist or Dist()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        corpus = Corpus.load(Path(cfg.corpus))
        self.docs = corpus.docs[: cfg.max_docs] if cfg.max_docs else corpus.docs
        self.probes = corpus.probes
        self.model, self.tokenizer, self.anchor_name = load_model_for(cfg)
        mc = self.model.config
        if cfg.memory_layers is None:
            cfg.memory_layers = list(range(mc.n_layers - min(cfg.mem_layers, mc.n_layers), mc.n_layers))
        self.layers = list(cfg.memory_layers)
        self.l0 = min(self.layers)
        self.train_anchor = bool(cfg.train_anchor or cfg.init_anchor)
        self.use_prefix = not (self.train_anchor or cfg.no_prefix_cache)
        self.tree, self.paths = route_documents(cfg, self.docs, self.out, self.dist, corpus.probes)
        if not 0.0 <= cfg.shared_prob <= 1.0:
            raise ValueError(f"--shared-prob must be in [0, 1], not {cfg.shared_prob}")
        self.memory = TrainableBank(cfg.branching, cfg.ranks, len(self.layers), mc.d_model, seed=cfg.seed,
                                    shared=cfg.shared_prob > 0,
                                    subtree=cfg.subtree, parents=self.tree.parents)
        trained = self.docs
        names = subject_names(self.docs) if cfg.name_anaphors or cfg.pronoun_views or cfg.skip_name_targets else []
        if cfg.name_anaphors:  # the training view only; routing (above) and preservation use the original
            trained = [{**d, "text": name_anaphors(d["text"], n)} for d, n in zip(self.docs, names, strict=True)]
        # training sequences: the documents, then `permuted_views` copies of each with its sentences reordered,
        # then `pronoun_views` (one per document with its later name openings made "It"), each on its
        # document's path; index i < len(docs) is document i
        extra: list[tuple[list[dict], list[int]]] = []
        if cfg.permuted_views > 0:
            extra.append(permuted_views(trained, cfg.permuted_views, cfg.seed))
        if cfg.pronoun_views:
            extra.append(pronoun_views(trained, names))
        self.train_paths = self.paths
        trained_names = list(names)  # the subject of every training sequence (with skip_name_targets)
        for views, of in extra:
            trained = trained + views
            trained_names += [names[i] for i in of] if names else []
            if of:
                self.train_paths = np.concatenate([self.train_paths, self.paths[of]])
        self.token_ids = tokenize_docs(self.tokenizer, [d["text"] for d in trained], MAX_DOC_TOKENS)
        # per training sequence, the tokens the loss may target (None: all of them)
        self.target_keep = (name_target_masks(self.tokenizer, [d["text"] for d in trained], trained_names,
                                              self.token_ids) if cfg.skip_name_targets else None)
        self.loss_start = loss_starts(self.tokenizer, trained, self.token_ids, cfg.loss)
        self.prefix: list[torch.Tensor | None] | None = None  # None entries: not computed yet
        self.surprising: list[torch.Tensor] | None = None  # per document, with --loss surprising
        self.preservation = Preservation(self, corpus.preserve) if cfg.preserve_weight > 0 else None
        params = self.memory.param_groups(cfg.lr, cfg.level_lr)
        if self.train_anchor:
            self.model.train().requires_grad_(True)
            params.append({"params": list(self.model.parameters()), "lr": cfg.anchor_lr})
        else:
            self.model.eval().requires_grad_(False)
        self.params = [p for g in params for p in g["params"]]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.batches_per_epoch = len(leaf_batches(self.train_paths, cfg.batch_size, cfg.seed, cfg.subtree))
        if self.batches_per_epoch == 0:
            raise ValueError(f"no documents to train (subtree={cfg.subtree})")
        self.steps_per_epoch = -(-self.batches_per_epoch // self.dist.world)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, self.total_steps))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.rng = random.Random(cfg.seed * 1000 + self.dist.rank)
        self.train_seconds = 0.0
        self.tokens_seen = 0
        # bfloat16 autocast where this machine's bf16 matmuls are clearly faster (measured; lm/dtype.py)
        from lm.dtype import fast_dtype

        self.compute_dtype, self.dtype_measurement = fast_dtype(cfg.compute_dtype)

    @contextmanager
    def _autocast(self):
        """The context of every training forward: bfloat16 autocast (where chosen) and the math attention
        kernel -- on CPU, the flash kernel's backward took a fifth of a step on these short documents."""
        from contextlib import nullcontext

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16_autocast()), \
                (sdpa_kernel([SDPBackend.MATH]) if self.model.device.type == "cpu" else nullcontext()):
            yield

    def _bf16_autocast(self) -> bool:
        return self.compute_dtype == torch.bfloat16 and self.model.device.type == "cpu"

    def _frozen_weights_to_compute_dtype(self) -> dict[torch.nn.Module, torch.Tensor]:
        """Under bfloat16 autocast, store the frozen anchor's linear weights from layer l0 up in bfloat16
        once, instead of autocast casting every one of them at every forward and backward (its cast cache
        holds only weights that require grad). The results are the same: autocast would have run these
        matmuls on the same bfloat16 values. Returns the float32 originals for `_restore_weights`. Only
        layers >= l0 run in training steps; layers below stay float32 for the prefix cache."""
        if self.train_anchor or not self._bf16_autocast():
            return {}
        saved: dict[torch.nn.Module, torch.Tensor] = {}
        for layer in self.model.model.layers[self.l0:]:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear) and mod.weight.dtype == torch.float32:
                    saved[mod] = mod.weight.data
                    mod.weight.data = mod.weight.data.to(torch.bfloat16)
        return saved

    @staticmethod
    def _restore_weights(saved: dict[torch.nn.Module, torch.Tensor]) -> None:
        for mod, w in saved.items():
            mod.weight.data = w

    # -- prefix cache ------------------------------------------------------------------------------------

    def build_prefix_cache(self) -> None:
        if not self.use_prefix:
            return
        f = self.out / f"prefix-rank{self.dist.rank}.pt"
        if f.exists():
            self.prefix = torch.load(f)
            if len(self.prefix) == len(self.token_ids):
                return
        if self.dist.world > 1:
            # each process sees other documents every epoch: fill its cache lazily, as batches come
            self.prefix = [None] * len(self.token_ids)
            return
        need = list(range(len(self.token_ids)))
        t0 = time.perf_counter()
        hs = prefix_hidden(self.model, [self.token_ids[i] for i in need], self.l0,
                           progress=self.cfg.progress and self.dist.main)
        cache: list[torch.Tensor | None] = [torch.empty(0)] * len(self.token_ids)
        for i, h in zip(need, hs, strict=True):
            cache[i] = h
        self.prefix = cache
        log.info("prefix cache of %d documents (layers 0..%d) in %.1fs", len(need), self.l0 - 1,
                 time.perf_counter() - t0)
        atomic_save(self.prefix, f)

    def build_surprising(self) -> None:
        """For ``--loss surprising``: per document, the positions whose next token the frozen anchor finds
        hardest (the top ``surprising_fraction`` by its loss): names and facts rather than the words any
        model predicts. The LM head -- most of a step's work -- then runs only there."""
        if self.cfg.loss != "surprising" or not self.use_prefix:
            return
        f = self.out / "surprising.pt"
        if f.exists():
            self.surprising = torch.load(f)
            return
        t0 = time.perf_counter()
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for s in range(0, len(self.token_ids), 32):
                idx = list(range(s, min(s + 32, len(self.token_ids))))
                ids, mask = pad_ids([self.token_ids[i] for i in idx])
                select, targets = loss_targets(ids, mask, [1] * len(idx))
                with self._autocast():
                    logits = self.model.forward_from(pad_hidden(self._prefix_of(idx)), self.l0, select=select)
                nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
                pos = 0
                for b, i in enumerate(idx):
                    n = int(select[b].sum())
                    k = max(1, math.ceil(self.cfg.surprising_fraction * n))
                    keep = torch.zeros(len(self.token_ids[i]), dtype=torch.bool)
                    top = torch.topk(nll[pos:pos + n], k).indices
                    keep[torch.nonzero(select[b]).flatten()[top]] = True
                    out.append(keep)
                    pos += n
        self.surprising = out
        atomic_save(out, f)
        log.info("surprising positions of %d documents in %.1fs", len(out), time.perf_counter() - t0)

    def _prefix_of(self, idx: list[int]) -> list[torch.Tensor]:
        prefix = self.prefix
        if prefix is None:
            raise RuntimeError("no prefix cache: build_prefix_cache() has not run")
        missing = [i for i in idx if prefix[i] is None]
        if missing:
            for i, h in zip(missing, prefix_hidden(self.model, [self.token_ids[i] for i in missing], self.l0),
                            strict=True):
                prefix[i] = h
        return cast("list[torch.Tensor]", [prefix[i] for i in idx])  # every entry of idx was filled above

    # -- one step --------------------------------------------------------------------------------------------

    def _my_batches(self, epoch: int) -> list[Batch]:
        batches = leaf_batches(self.train_paths, self.cfg.batch_size, self.cfg.seed * 7919 + epoch, self.cfg.subtree)
        return batches[self.dist.rank::self.dist.world]

    def paths_memory(self, paths, generic: bool | Sequence[bool], shared: Sequence[bool] | None = None):
        """MemoryBatch for rows with these paths (distinct blocks listed once); a row whose `generic` flag is
        set (one flag for all rows, or one per row) uses the generic memory instead of its path; a path row
        whose `shared` flag is set also carries the training-only shared block."""
        from lm import MemoryBatch

        flags = [generic] * len(paths) if isinstance(generic, bool) else list(generic)
        extra = list(shared) if shared is not None else [False] * len(paths)
        refs = [[_GENERIC] if g else [(level, int(i)) for level, i in enumerate(path, start=1)] + [_SHARED] * sh
                for path, g, sh in zip(paths, flags, extra, strict=True)]
        return MemoryBatch.from_paths(refs, self._block_of, self.layers)

    def _block_of(self, key) -> torch.Tensor:
        if key == _GENERIC:
            return self.memory.generic
        if key == _SHARED:
            if self.memory.shared is None:
                raise RuntimeError("no shared block: --shared-prob is 0")
            return self.memory.shared
        return self.memory.block(*cast("tuple[int, int]", key))

    def batch_loss(self, batch: Batch, generic: bool = False) -> torch.Tensor:
        """Next-token loss of the batch's documents through anchor + their paths' blocks (or the generic)."""
        return self.batch_losses(batch, (generic,))[0]

    def loss_select(self, doc_index: Sequence[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions of the padded sequences `ids` whose next token is a loss target."""
        select, _ = loss_targets(ids, mask, [self.loss_start[i] for i in doc_index])
        if self.surprising is not None:  # only the positions where the anchor was most surprised
            keep = torch.zeros_like(select)
            for b, i in enumerate(doc_index):
                keep[b, :len(self.surprising[i])] = self.surprising[i]
            select = select & keep
        if self.target_keep is not None:  # position t predicts token t + 1: not the subject's name
            keep = torch.ones_like(select)
            for b, i in enumerate(doc_index):
                keep[b, :len(self.target_keep[i]) - 1] = self.target_keep[i][1:]
            select = select & keep
        return select

    def batch_losses(self, batch: Batch, systems: Sequence[bool] = (False,)) -> list[torch.Tensor]:
        """`batch_loss` for each system (False: the paths' blocks, True: the generic memory) in one forward: the
        documents repeated once per system, so the frozen anchor runs one batch of k*B rows instead of k
        batches of B (fewer, larger ops; the losses and gradients are those of separate passes)."""
        ids, mask = pad_ids([self.token_ids[i] for i in batch.doc_index])
        select = self.loss_select(batch.doc_index, ids, mask)
        targets = torch.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets = targets[select]  # (N,)
        k = len(systems)
        p = self.cfg.shared_prob
        shared = [not g and p > 0 and self.rng.random() < p for g in systems for _ in batch.paths]
        memory = self.paths_memory(list(batch.paths) * k, [g for g in systems for _ in batch.paths], shared)
        with self._autocast():
            if self.use_prefix:
                hidden = pad_hidden(self._prefix_of(batch.doc_index))  # (B, T, d) entering layer l0
                logits = self.model.forward_from(hidden.repeat(k, 1, 1), self.l0, memory=memory,
                                                 select=select.repeat(k, 1))  # (k*N, V), system by system
            else:
                logits = self.model.forward_from(self.model.hidden_at(ids.repeat(k, 1), 0), 0, memory=memory,
                                                 select=select.repeat(k, 1))
        n = targets.shape[0]
        return [torch.nn.functional.cross_entropy(logits[j * n:(j + 1) * n].float(), targets) for j in range(k)]

    def step(self, batch: Batch | None) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        if batch is not None:
            keep = self.preservation if self.preservation is not None and self.preservation.ready else None
            rows = keep.rows_for(batch) if keep is not None else []
            # the generic memory trains beside the tree's blocks on the same documents (the baseline of the
            # evaluation, same epochs), in the same forward
            systems = (False, True) if self.rng.random() < self.cfg.generic_prob else (False,)
            losses = self.batch_losses(batch, systems)
            total = sum(losses, torch.zeros(()))
            stats["loss"] = float(losses[0].detach())
            if keep is not None and rows:  # the tree's blocks only (Preservation.loss)
                kl = keep.loss(rows)
                total = total + self.cfg.preserve_weight * kl
                stats["kl"] = float(kl.detach())
            if len(systems) > 1:
                stats["loss_generic"] = float(losses[1].detach())
            total.backward()
            self.tokens_seen += sum(len(self.token_ids[i]) for i in batch.doc_index)
        sync_gradients(self.params, self.dist)
        if self.train_anchor:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], 1.0)
        self.opt.step()
        self.sched.step()
        return stats

    # -- checkpoints -----------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        if not self.dist.main:
            return
        state = {"memory": self.memory.state_dict(), "optim": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "global_step": self.global_step, "train_seconds": self.train_seconds,
                 "tokens_seen": self.tokens_seen, "rng": self.rng.getstate(), "config": asdict(self.cfg)}
        if self.train_anchor:
            state["anchor"] = self.model.state_dict()
        atomic_save(state, self.out / "checkpoint.pt")

    def resume(self) -> bool:
        f = self.out / "checkpoint.pt"
        if not f.exists():
            return False
        state = torch.load(f, weights_only=False)
        self.memory.load_state_dict(state["memory"])
        if self.train_anchor and "anchor" in state:
            self.model.load_state_dict(state["anchor"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.train_seconds = state["global_step"], state["train_seconds"]
        self.tokens_seen = state.get("tokens_seen", 0)
        if self.dist.world == 1:
            self.rng.setstate(state["rng"])
        log.info("resumed from %s at epoch %d step %d", f, self.epoch, self.step_in_epoch)
        return True

    # -- the loop --------------------------------------------------------------------------------------------

    def train(self) -> dict:
        self.resume()
        self.build_prefix_cache()
        self.build_surprising()
        if self.preservation is not None and not self.train_anchor:
            self.preservation.build()
        saved = self._frozen_weights_to_compute_dtype()
        try:
            return self._loop()
        finally:
            self._restore_weights(saved)

    def _loop(self) -> dict:
        bar = None
        if self.cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step")
        while self.epoch < self.cfg.epochs:
            batches = self._my_batches(self.epoch)
            while self.step_in_epoch < self.steps_per_epoch:
                batch = batches[self.step_in_epoch] if self.step_in_epoch < len(batches) else None
                t0 = time.perf_counter()
                stats = self.step(batch)
                self.train_seconds += time.perf_counter() - t0
                self.step_in_epoch += 1
                self.global_step += 1
                if bar is not None:
                    bar.update(1)
                    tok_s = self.tokens_seen * self.dist.world / max(self.train_seconds, 1e-9)
                    bar.set_postfix(epoch=self.epoch, loss=f"{stats.get('loss', float('nan')):.3f}",
                                    kl=f"{stats.get('kl', float('nan')):.3f}",
                                    generic=f"{stats.get('loss_generic', float('nan')):.3f}",
                                    tok_s=f"{tok_s:.0f}")
                if self.global_step % self.cfg.checkpoint_every == 0:
                    self.checkpoint()
            self.epoch += 1
            self.step_in_epoch = 0
            self.checkpoint()
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        """Write memory.safetensors, the trained anchor (if any) and job.json (rank 0)."""
        from safetensors.torch import save_file

        barrier(self.dist)
        info: dict = {}
        if self.dist.main:
            scale = self.memory_scale()
            tensors = {k: scaled(v, scale["scale"]).contiguous() for k, v in self.memory.nodes.items()}
            if self.cfg.generic_prob > 0:  # never trained otherwise: the bank gets no generic memory
                tensors["generic"] = scaled(self.memory.generic, scale["generic_scale"]).contiguous()
            save_file(tensors, str(self.out / "memory.safetensors.tmp"))
            os.replace(self.out / "memory.safetensors.tmp", self.out / "memory.safetensors")
            identity, anchor_ref = self._anchor_identity()
            mc = self.model.config
            info = {
                "branching": list(self.cfg.branching), "ranks": list(self.cfg.ranks),
                "memory_layers": self.layers, "embedder": self.cfg.embedder,
                "embedder_dim": int(np.load(self.out / "doc_emb.npy", mmap_mode="r").shape[1]),
                "n_layers": mc.n_layers, "d_model": mc.d_model,
                "anchor": anchor_ref, "anchor_identity": identity, "subtree": self.cfg.subtree,
                "n_docs": len(self.docs),
                "n_docs_trained": int(sum(len(b.doc_index) for b in
                                          leaf_batches(self.train_paths, self.cfg.batch_size, 0,
                                                       self.cfg.subtree))),
                "epochs": self.cfg.epochs, "steps": self.global_step, "train_seconds": self.train_seconds,
                "tokens_seen": self.tokens_seen * self.dist.world, "world_size": self.dist.world,
                "prefix_cache": self.use_prefix, "memory_scale": scale, "done": True,
            }
            (self.out / "job.json").write_text(json.dumps(info, indent=2) + "\n")
        barrier(self.dist)
        return info

    def memory_scale(self) -> dict:
        """The output scales folded into the saved blocks (training/scale.py): `--memory-scale` when it is a
        number; with "auto", chosen on the corpus's ``valid`` probes through their facts' paths (1.0 for a
        subtree job, whose blocks are merged with others', and for a corpus without valid probes)."""
        if self.cfg.memory_scale != "auto":
            s = _given_scale(self.cfg.memory_scale)
            return {"scale": s, "generic_scale": s, "source": "--memory-scale"}
        index = {d["id"]: i for i, d in enumerate(self.docs)}
        valid = [p for p in self.probes if p.split == "valid" and p.doc_ids and p.doc_ids[0] in index]
        if self.cfg.subtree is not None or not valid:
            return {"scale": 1.0, "generic_scale": 1.0,
                    "source": "subtree job" if self.cfg.subtree is not None else "no valid probes"}
        from training.scale import calibrate_memory_scale

        with self._autocast():
            out = calibrate_memory_scale(self.model, self.tokenizer, valid,
                                         [self.paths[index[p.doc_ids[0]]] for p in valid], self.layers,
                                         self.memory.block,
                                         self.memory.generic.detach() if self.cfg.generic_prob > 0 else None)
        return {**out, "source": "valid probes"}

    def _anchor_identity(self) -> tuple[dict, str]:
        if not self.train_anchor:
            from lm import load_anchor

            return load_anchor(self.cfg.anchor).identity, self.anchor_name
        from lm.weights import save_anchor_dir

        self.model.eval()
        source = "pretrained from scratch with memories" if self.cfg.init_anchor else "co-trained with memories"
        identity = save_anchor_dir(self.model, self.tokenizer, self.out / "anchor", name="trained",
                                   source=f"hiermem train: {source}")
        return identity, str((self.out / "anchor").resolve())


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; export the bank unless it is a subtree job. Returns job.json's dict."""
    d = init_distributed()
    if cfg.threads != "keep":
        from lm.dtype import pick_threads

        torch.set_num_threads(pick_threads(cfg.threads) if d.world == 1 else 1)
        log.info("torch threads: %d", torch.get_num_threads())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if d.main:
        (out / "config.json").write_text(cfg.to_json() + "\n")
    trainer = Trainer(cfg, d)
    info = trainer.train()
    if d.main and cfg.subtree is None:
        from training.export import export_job

        bank_dir = Path(cfg.bank) if cfg.bank else out / "bank"
        info["bank_id"] = export_job(out, bank_dir, n_shards=cfg.shards, dtype=cfg.dtype)
        info["bank"] = str(bank_dir)
        (out / "job.json").write_text(json.dumps(info, indent=2) + "\n")
    barrier(d)
    return info


def run_train_command(cfg: TrainConfig) -> int:
    if not cfg.corpus or not cfg.out:
        raise SystemExit("hiermem train needs --corpus and --out")
    info = train(cfg)
    if init_distributed().main:
        print(json.dumps({k: info[k] for k in ("steps", "train_seconds", "bank") if k in info}))
    return 0
