"""`hiermem train`: memories on a frozen anchor (or co-trained with it), one code path for 1 or N processes.

A job directory (``--out``) holds everything a run needs to resume and to export:

    config.json          the TrainConfig as given
    tree.safetensors     the cluster tree (built from the documents, or copied from --tree)
    doc_emb.npy          the documents' routing embeddings; doc_paths.npy their routes
    prefix-rank<R>.pt    the prefix cache of process R (frozen anchor only; training/prefix.py)
    preserve.pt          the preservation prompts' states and KL targets (training/preservation.py)
    distill.pt           the context-distillation prompts' teacher targets and states (training/distill.py)
    checkpoint.pt        memories + optimizer + schedule + position in the epoch (atomic writes)
    memory.safetensors   the trained blocks ("<level>_<index>") and "generic", when training ended
    anchor/              the trained anchor, with --train-anchor / --init-anchor
    job.json             what export needs: spec fields, anchor identity and where to load it, counts, timings

Under ``torchrun --nproc_per_node N`` every process takes every N-th batch and the memory gradients are
all-reduced (gloo on CPU, nccl on GPUs) before each AdamW step; rank 0 writes checkpoints and the bank.

The parts: the training sequences (training/data.py: `TrainingSet`), their prefix cache (training/prefix.py),
the compute dtype (training/compute.py), the trainable blocks (training/trainable_bank.py), preservation
(training/preservation.py) and the blocks' output scale (training/scale.py); the trainer holds them together
and runs the steps, the loop, the checkpoints and the job's outputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from training.compute import Compute
from training.config import TrainConfig
from training.corpus import Corpus
from training.data import Batch, TrainingSet, atomic_save, leaf_batches, pad_hidden, pad_ids
from training.distill import Distillation
from training.distributed import Dist, barrier, init_distributed, sync_gradients
from training.export import save_documents
from training.prefix import PrefixCache, surprising_positions
from training.preservation import Preservation, PreserveSource
from training.routing import embed, get_embedder, route_documents
from training.scale import given_scale, job_memory_scale, scaled
from training.throughput import Throughput
from training.trainable_bank import TrainableBank
from training.views import subject_names

log = logging.getLogger(__name__)


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


class Trainer:
    """Holds the model, the memories, the data and the optimizer of one job (one process of it)."""

    def __init__(self, cfg: TrainConfig, dist: Dist | None = None):
        self.cfg = cfg
        if cfg.memory_scale != "auto":
            given_scale(cfg.memory_scale)  # a bad value fails now, not after training
        if not 0.0 <= cfg.shared_prob <= 1.0:
            raise ValueError(f"--shared-prob must be in [0, 1], not {cfg.shared_prob}")
        self.dist = dist or Dist()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        corpus = Corpus.load(Path(cfg.corpus))
        self.docs = corpus.docs[: cfg.max_docs] if cfg.max_docs else corpus.docs
        self.probes = corpus.probes
        self.model, self.tokenizer, self.anchor_name = load_model_for(cfg)
        mc = self.model.config
        self.layers = cfg.memory_layers_of(mc.n_layers)  # the caller's config keeps its own value
        self.l0 = min(self.layers)
        self.train_anchor = bool(cfg.train_anchor or cfg.init_anchor)
        self.use_prefix = not (self.train_anchor or cfg.no_prefix_cache)
        self.tree, self.paths = route_documents(cfg, self.docs, self.out, self.dist, corpus.probes)
        self.memory = TrainableBank(cfg.branching, cfg.ranks, len(self.layers), mc.d_model, seed=cfg.seed,
                                    shared=cfg.shared_prob > 0,
                                    subtree=cfg.subtree, parents=self.tree.parents)
        self.data = TrainingSet(self.tokenizer, self.docs, self.paths, loss=cfg.loss, seed=cfg.seed,
                                name_anaphors=cfg.name_anaphors, permuted_views=cfg.permuted_views,
                                pronoun_views=cfg.pronoun_views, skip_name_targets=cfg.skip_name_targets)
        self.prefix: PrefixCache | None = None  # build_prefix_cache()
        self.surprising: list[torch.Tensor] | None = None  # per training sequence, with --loss surprising
        self._optimizer()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.rng = random.Random(cfg.seed * 1000 + self.dist.rank)
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.compute = Compute(self.model, cfg.compute_dtype)
        self.throughput = Throughput(self.compute.dtype)
        self.preservation = self._preservation(corpus.preserve) if cfg.preserve_weight > 0 else None
        self.distillation = self._distillation() if cfg.distill_weight > 0 else None

    def _optimizer(self) -> None:
        """AdamW over the memories (and the anchor, when it trains too) and its schedule over the job's steps."""
        cfg = self.cfg
        params = self.memory.param_groups(cfg.lr, cfg.level_lr)
        if self.train_anchor:
            self.model.train().requires_grad_(True)
            params.append({"params": list(self.model.parameters()), "lr": cfg.anchor_lr})
        else:
            self.model.eval().requires_grad_(False)
        self.params = [p for g in params for p in g["params"]]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.batches_per_epoch = len(leaf_batches(self.data.paths, cfg.batch_size, cfg.seed, cfg.subtree))
        if self.batches_per_epoch == 0:
            raise ValueError(f"no documents to train (subtree={cfg.subtree})")
        self.steps_per_epoch = -(-self.batches_per_epoch // self.dist.world)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, self.total_steps))

    def _preservation(self, rows: list[dict]) -> Preservation:
        cfg = self.cfg

        def embed_prompts(texts: list[str]) -> np.ndarray:
            return embed(texts, get_embedder(cfg.embedder))

        source = PreserveSource(rows, self.docs, self.paths, self.tree, self.out / "router", embed_prompts,
                                per_doc=cfg.preserve_per_doc, seed=cfg.seed)
        return Preservation(source, model=self.model, tokenizer=self.tokenizer, layer=self.l0,
                            memory_for=partial(self.memory.memory_batch, layers=self.layers),
                            autocast=self.compute.autocast, rng=self.rng, per_step=cfg.preserve_batch,
                            cache_file=self.out / "preserve.pt", subtree=cfg.subtree)

    def _distillation(self) -> Distillation:
        if not self.use_prefix:
            raise ValueError("--distill-weight needs the frozen anchor's prefix cache (no --train-anchor, "
                             "--init-anchor or --no-prefix-cache)")
        return Distillation(self.docs, subject_names(self.docs), self.paths, model=self.model,
                            tokenizer=self.tokenizer, chat_template=getattr(self.tokenizer, "chat_template", None),
                            layer=self.l0, memory_for=partial(self.memory.memory_batch, layers=self.layers),
                            autocast=self.compute.autocast, rng=self.rng, per_step=self.cfg.distill_batch,
                            cache_file=self.out / "distill.pt", n_tokens=self.cfg.distill_tokens,
                            seed=self.cfg.seed)

    # -- prefix cache ------------------------------------------------------------------------------------

    def build_prefix_cache(self) -> None:
        if not self.use_prefix:
            return
        self.prefix = PrefixCache(self.model, self.data.token_ids, self.l0, self.out / f"prefix-rank{self.dist.rank}.pt")
        self.prefix.load_or_build(lazy=self.dist.world > 1, progress=self.cfg.progress and self.dist.main)

    def build_surprising(self) -> None:
        """For ``--loss surprising``: the positions the loss covers (training/prefix.py)."""
        if self.cfg.loss != "surprising" or not self.use_prefix:
            return
        self.surprising = surprising_positions(self.model, self._prefix(), self.cfg.surprising_fraction,
                                               self.compute.autocast, self.out / "surprising.pt")

    def _prefix(self) -> PrefixCache:
        if self.prefix is None:
            raise RuntimeError("no prefix cache: build_prefix_cache() has not run")
        return self.prefix

    # -- one step --------------------------------------------------------------------------------------------

    def _my_batches(self, epoch: int) -> list[Batch]:
        batches = leaf_batches(self.data.paths, self.cfg.batch_size, self.cfg.seed * 7919 + epoch, self.cfg.subtree)
        return batches[self.dist.rank::self.dist.world]

    def paths_memory(self, paths, generic: bool | Sequence[bool], shared: Sequence[bool] | None = None):
        """`TrainableBank.memory_batch` on this job's memory layers."""
        return self.memory.memory_batch(paths, self.layers, generic, shared)

    def batch_loss(self, batch: Batch, generic: bool = False) -> torch.Tensor:
        """Next-token loss of the batch's documents through anchor + their paths' blocks (or the generic)."""
        return self.batch_losses(batch, (generic,))[0]

    def batch_losses(self, batch: Batch, systems: Sequence[bool] = (False,)) -> list[torch.Tensor]:
        """`batch_loss` for each system (False: the paths' blocks, True: the generic memory) in one forward: the
        documents repeated once per system, so the frozen anchor runs one batch of k*B rows instead of k
        batches of B (fewer, larger ops; the losses and gradients are those of separate passes)."""
        ids, mask = pad_ids([self.data.token_ids[i] for i in batch.doc_index])
        select = self.data.loss_select(batch.doc_index, ids, mask, self.surprising)
        targets = torch.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets = targets[select]  # (N,)
        k = len(systems)
        p = self.cfg.shared_prob
        shared = [not g and p > 0 and self.rng.random() < p for g in systems for _ in batch.paths]
        memory = self.paths_memory(list(batch.paths) * k, [g for g in systems for _ in batch.paths], shared)
        with self.compute.autocast():
            if self.use_prefix:
                hidden = pad_hidden(self._prefix().states(batch.doc_index))  # (B, T, d) entering layer l0
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
            self.throughput.add_tokens(len(systems) * len(batch.doc_index)
                                       * max(len(self.data.token_ids[i]) for i in batch.doc_index))
            total = sum(losses, torch.zeros(()))
            stats["loss"] = float(losses[0].detach())
            if keep is not None and rows:  # the tree's blocks only (Preservation.loss)
                kl = keep.loss(rows)
                total = total + self.cfg.preserve_weight * kl
                stats["kl"] = float(kl.detach())
            teach = self.distillation
            drows = teach.rows_for(batch, self.data.doc_of) if teach is not None and teach.ready else []
            if teach is not None and drows:  # the tree's blocks as the document in context (training/distill.py)
                dkl = teach.loss(drows)
                total = total + self.cfg.distill_weight * dkl
                stats["distill"] = float(dkl.detach())
            if len(systems) > 1:
                stats["loss_generic"] = float(losses[1].detach())
            total.backward()
            self.tokens_seen += self.data.n_tokens(batch.doc_index)
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
                 "tokens_seen": self.tokens_seen, "throughput": self.throughput.state_dict(),
                 "rng": self.rng.getstate(),
                 "config": {**self.cfg.model_dump(), "memory_layers": self.layers}}
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
        self.throughput.load_state_dict(state.get("throughput", {}))
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
        if self.distillation is not None:
            self.distillation.build(progress=self.cfg.progress and self.dist.main)
        saved = {} if self.train_anchor else self.compute.store_frozen_weights(self.l0)
        try:
            return self._loop()
        finally:
            self.compute.restore_weights(saved)

    def _loop(self) -> dict:
        from training.progress import task

        bar = task("train", self.total_steps, "step", initial=self.global_step,
                   enabled=self.cfg.progress and self.dist.main)
        while self.epoch < self.cfg.epochs:
            batches = self._my_batches(self.epoch)
            while self.step_in_epoch < self.steps_per_epoch:
                batch = batches[self.step_in_epoch] if self.step_in_epoch < len(batches) else None
                t0 = time.perf_counter()
                with self.throughput.step(self.global_step):
                    stats = self.step(batch)
                self.train_seconds += time.perf_counter() - t0
                self.step_in_epoch += 1
                self.global_step += 1
                tok_s = self.tokens_seen * self.dist.world / max(self.train_seconds, 1e-9)
                bar.set_postfix_str(
                    f"epoch={self.epoch}, loss={stats.get('loss', float('nan')):.3f}, "
                    f"kl={stats.get('kl', float('nan')):.3f}, distill={stats.get('distill', float('nan')):.3f}, "
                    f"generic={stats.get('loss_generic', float('nan')):.3f}, tok_s={tok_s:.0f}, "
                    f"flops={self.throughput.ratio(self.train_seconds):.0%}")
                bar.update(1)
                if self.global_step % self.cfg.checkpoint_every == 0:
                    self.checkpoint()
            self.epoch += 1
            self.step_in_epoch = 0
            self.checkpoint()
        bar.close()
        return self.finish()

    # -- the job's outputs -----------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Write memory.safetensors (the blocks, their output scale folded in), the trained anchor (if any) and
        job.json (rank 0)."""
        barrier(self.dist)
        info: dict = {}
        throughput = self.throughput.summary(self.train_seconds, self.dist)  # every process: summed counts
        if self.dist.main:
            scale = self.memory_scale()
            self._save_memory(scale)
            save_documents(self.out, self.docs, self.paths, self.cfg, self.layers)
            identity, anchor_ref = self._anchor_identity()
            info = self._job_info(identity, anchor_ref, scale, throughput)
            (self.out / "job.json").write_text(json.dumps(info, indent=2) + "\n")
        barrier(self.dist)
        return info

    def memory_scale(self) -> dict:
        """The output scales folded into the saved blocks (training/scale.py: `job_memory_scale`)."""
        return job_memory_scale(self.cfg.memory_scale, subtree=self.cfg.subtree, docs=self.docs, probes=self.probes,
                                doc_paths=self.paths, model=self.model, tokenizer=self.tokenizer, layers=self.layers,
                                get_block=self.memory.block,
                                generic=self.memory.generic.detach() if self.cfg.generic_prob > 0 else None,
                                autocast=self.compute.autocast, progress=self.cfg.progress and self.dist.main)

    def _save_memory(self, scale: dict) -> None:
        """memory.safetensors: the tree's blocks ("<level>_<index>") and, when trained, "generic"."""
        import os

        from safetensors.torch import save_file

        tensors = {k: scaled(v, scale["scale"]).contiguous() for k, v in self.memory.nodes.items()}
        if self.cfg.generic_prob > 0:  # never trained otherwise: the bank gets no generic memory
            tensors["generic"] = scaled(self.memory.generic, scale["generic_scale"]).contiguous()
        save_file(tensors, str(self.out / "memory.safetensors.tmp"))
        os.replace(self.out / "memory.safetensors.tmp", self.out / "memory.safetensors")

    def _job_info(self, identity: dict, anchor_ref: str, scale: dict, throughput: dict) -> dict:
        """job.json: what export needs (spec fields, the anchor's identity and where to load it), counts, timings."""
        mc = self.model.config
        return {
            "branching": list(self.cfg.branching), "ranks": list(self.cfg.ranks),
            "memory_layers": self.layers, "embedder": self.cfg.embedder,
            "embedder_dim": int(np.load(self.out / "doc_emb.npy", mmap_mode="r").shape[1]),
            "n_layers": mc.n_layers, "d_model": mc.d_model,
            "anchor": anchor_ref, "anchor_identity": identity, "subtree": self.cfg.subtree,
            "n_docs": len(self.docs),
            "n_docs_trained": int(sum(len(b.doc_index) for b in
                                      leaf_batches(self.data.paths, self.cfg.batch_size, 0, self.cfg.subtree))),
            "epochs": self.cfg.epochs, "steps": self.global_step, "train_seconds": self.train_seconds,
            "tokens_seen": self.tokens_seen * self.dist.world, "world_size": self.dist.world,
            "prefix_cache": self.use_prefix, "memory_scale": scale,
            # the job's FLOPs and FLOP/s against the machine's matmul yardstick (training/throughput.py)
            "throughput": throughput, "done": True,
        }

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
