"""The trainer on the tiny anchor: prefix cache is exact, steps lower the loss, checkpoints resume,
the exported bank round-trips through memory_store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.training.conftest import tiny_config
from training.trainer import Trainer, train


def _nonzero_memory(trainer: Trainer, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.memory.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_prefix_cache_gives_the_same_loss_and_gradients(corpus_dir, tmp_path):
    cached = Trainer(tiny_config(corpus_dir, tmp_path / "a", loss="all"))
    plain = Trainer(tiny_config(corpus_dir, tmp_path / "b", loss="all", no_prefix_cache=True))
    assert cached.l0 == 2 and cached.use_prefix and not plain.use_prefix
    plain.memory.load_state_dict(cached.memory.state_dict())
    _nonzero_memory(cached)
    plain.memory.load_state_dict(cached.memory.state_dict())
    cached.build_prefix_cache()
    batch = cached._my_batches(0)[0]
    assert len({p[0] for p in batch.paths}) >= 1
    losses, grads = [], []
    for t in (cached, plain):
        for generic in (False, True):
            t.memory.zero_grad(set_to_none=True)
            loss = t.batch_loss(batch, generic=generic)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append({k: p.grad.clone() for k, p in t.memory.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[2]) < 1e-5 and abs(losses[1] - losses[3]) < 1e-5
    for a, b in ((grads[0], grads[2]), (grads[1], grads[3])):
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # only the blocks on the batch's paths (or the generic) received gradients
    on_paths = {f"nodes.{lv}_{i}" for p in batch.paths for lv, i in enumerate(p, start=1)}
    assert set(grads[0]) == on_paths
    assert set(grads[1]) == {"generic"}


def test_one_forward_for_both_systems_gives_the_losses_and_gradients_of_separate_passes(corpus_dir, tmp_path):
    """A step trains the tree's blocks and the generic memory in one forward of the documents repeated per
    system: the same losses and gradients as one forward per system."""
    t = Trainer(tiny_config(corpus_dir, tmp_path / "j", loss="all"))
    _nonzero_memory(t, scale=0.2)
    t.build_prefix_cache()
    batch = t._my_batches(0)[0]

    def run(together: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        t.memory.zero_grad(set_to_none=True)
        if together:
            losses = t.batch_losses(batch, (False, True))
        else:
            losses = [t.batch_loss(batch, generic=g) for g in (False, True)]
        sum(losses).backward()
        return [float(x.detach()) for x in losses], {k: p.grad.clone() for k, p in t.memory.named_parameters()
                                                      if p.grad is not None}

    (apart, g_apart), (joint, g_joint) = run(False), run(True)
    assert joint == pytest.approx(apart, rel=1e-5, abs=1e-7) and min(apart) > 0
    assert g_joint.keys() == g_apart.keys() and "generic" in g_joint
    for k in g_apart:
        torch.testing.assert_close(g_joint[k], g_apart[k], rtol=1e-4, atol=1e-6)


def test_steps_lower_the_loss_and_resume_from_checkpoint(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "job", epochs=3, lr=3e-2)
    t = Trainer(cfg)
    t.build_prefix_cache()
    batches = t._my_batches(0)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(t.batch_loss(b)) for b in batches) / len(batches)

    before = mean_loss()
    t.train()
    after = mean_loss()
    assert after < before - 0.5, (before, after)
    ck = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 3 and ck["global_step"] == t.total_steps
    # a new trainer on the same job directory resumes at the end and does no more steps
    again = Trainer(cfg)
    again.resume()
    assert again.global_step == t.total_steps
    for k, v in t.memory.state_dict().items():
        torch.testing.assert_close(again.memory.state_dict()[k], v)


def test_level_lr_scales_each_levels_blocks_and_leaves_the_generic_at_lr(corpus_dir, tmp_path):
    t = Trainer(tiny_config(corpus_dir, tmp_path / "job", lr=1e-2, level_lr=[1.0, 3.0]))
    by_param = {id(p): g["lr"] for g in t.opt.param_groups for p in g["params"]}
    assert by_param[id(t.memory.generic)] == pytest.approx(1e-2)
    for key, p in t.memory.nodes.items():
        level = int(key.split("_")[0])
        assert by_param[id(p)] == pytest.approx(1e-2 * (1.0 if level == 1 else 3.0)), key
    assert len(by_param) == len(list(t.memory.parameters()))  # every block in exactly one group
    # one AdamW step moves a leaf's block about 3x as far as its level-1 block (same gradient scale
    # does not matter: Adam's first step is lr * sign-like)
    t.build_prefix_cache()
    batch = t._my_batches(0)[0]
    before = {k: p.detach().clone() for k, p in t.memory.nodes.items()}
    t.step(batch)
    path = batch.paths[0]
    top, leaf = f"1_{path[0]}", f"2_{path[1]}"
    move = {k: float((t.memory.nodes[k].detach() - before[k]).abs().max()) for k in (top, leaf)}
    assert move[top] > 0 and move[leaf] == pytest.approx(3 * move[top], rel=0.2), move
    with pytest.raises(ValueError, match="level_lr has 3 entries"):
        Trainer(tiny_config(corpus_dir, tmp_path / "bad", level_lr=[1.0, 1.0, 1.0]))


def test_exported_bank_round_trips(corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from memory_store import Bank, NodeRef
    from memory_store.ops import verify_bank

    cfg = tiny_config(corpus_dir, tmp_path / "job", shards=2)
    info = train(cfg)
    # the layers --mem-layers chose are the trainer's: the config keeps None, as config.json does, while
    # job.json and the checkpoint record them
    assert cfg.memory_layers is None and info["memory_layers"] == [2, 3]
    tp = info["throughput"]  # every job reports its FLOPs against the machine's matmul FLOP/s
    assert tp["train_flops"] > 0 and tp["matmul_flops_per_s"] > 0 and 0 < tp["flops_ratio"] < 10
    assert json.loads((tmp_path / "job" / "config.json").read_text()) == {**cfg.model_dump(), "memory_layers": None}
    ck = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert ck["config"] == {**cfg.model_dump(), "memory_layers": [2, 3]}
    bank = Bank.open(info["bank"])
    assert bank.bank_id == info["bank_id"]
    assert bank.spec.memory_layers == [2, 3] and bank.spec.branching == [2, 2]
    assert bank.spec.embedder_name == "hash-trigram" and len(bank.shard_ids) == 2
    trained = load_file(str(tmp_path / "job" / "memory.safetensors"))
    for level in (1, 2):
        for index in range(bank.spec.nodes_at(level)):
            torch.testing.assert_close(bank.read_block(NodeRef(level, index)), trained[f"{level}_{index}"])
    torch.testing.assert_close(bank.generic_block(), trained["generic"])
    assert verify_bank(info["bank"]).ok
    from lm import load_anchor

    assert bank.anchor.model_dump() == load_anchor("tiny").identity


def test_train_anchor_and_init_anchor_run_the_same_trainer(corpus_dir, tmp_path):
    from lm import load_anchor
    from memory_store import Bank

    tiny = load_anchor("tiny")
    info = train(tiny_config(corpus_dir, tmp_path / "co", train_anchor=True))
    co = load_anchor(info["anchor"])
    assert co.identity == info["anchor_identity"] != tiny.identity
    assert Bank.open(info["bank"]).anchor.model_dump() == co.identity
    moved = sum(float((a - b).abs().sum())
                for a, b in zip(co.model.parameters(), tiny.model.parameters(), strict=True))
    assert moved > 0

    cfg_file = tmp_path / "anchor.json"
    cfg_file.write_text(json.dumps({"d_model": 32, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
                                    "ffn_dim": 64, "tie_embeddings": False}))
    info = train(tiny_config(corpus_dir, tmp_path / "init", init_anchor=str(cfg_file)))
    new = load_anchor(info["anchor"])
    assert (new.config.n_layers, new.config.d_model) == (3, 32)
    bank = Bank.open(info["bank"])
    assert bank.spec.memory_layers == [1, 2] and bank.anchor.model_dump() == new.identity


def test_preserve_loss_is_zero_for_a_fresh_memory_and_trains_the_routed_blocks(corpus_dir, tmp_path):
    t = Trainer(tiny_config(corpus_dir, tmp_path / "p", preserve_weight=1.0, preserve_batch=6))
    keep = t.preservation
    assert keep is not None and keep.source.rows  # the corpus's preserve.jsonl
    t.build_prefix_cache()
    keep.build()
    assert keep.data is not None and keep.data["source"] == "preserve.jsonl"
    batch = t._my_batches(0)[0]
    rows = keep.rows_for(batch)
    assert len(rows) == 6
    assert float(keep.loss(rows).detach()) < 1e-4  # down blocks start at zero: memory = anchor
    _nonzero_memory(t, scale=0.5)
    kl = keep.loss(rows)
    assert float(kl) > 1e-3, float(kl)
    kl.backward()
    touched = {k for k, p in t.memory.named_parameters() if p.grad is not None}
    routed = {f"nodes.{lv}_{i}" for r in rows for lv, i in enumerate(keep.data["paths"][r], start=1)}
    assert touched == routed


def test_a_step_holds_only_the_tree_blocks_to_the_anchor_and_trains_the_generic_on_the_documents(corpus_dir,
                                                                                               tmp_path):
    t = Trainer(tiny_config(corpus_dir, tmp_path / "g", loss="all", preserve_weight=1.0, preserve_batch=6, lr=0.0))
    _nonzero_memory(t, scale=0.5)
    t.build_prefix_cache()
    t.preservation.build()
    batch = t._my_batches(0)[0]
    stats = t.step(batch)  # lr 0: the parameters stay, the gradients are kept
    assert "kl" in stats and "loss_generic" in stats
    from_step = t.memory.generic.grad.clone()
    t.memory.zero_grad(set_to_none=True)
    t.batch_losses(batch, (True,))[0].backward()
    torch.testing.assert_close(from_step, t.memory.generic.grad, rtol=1e-4, atol=1e-7)


def test_without_a_preserve_file_the_prompts_are_derived_from_the_documents(tmp_path):
    from training.corpus import Corpus
    from training.preservation import derive_preserve_prompts

    docs = [{"id": "a", "text": "Kisumu is a city in Kenya. It observes UTC+3."},
            {"id": "b", "text": "The city of Kisumu lies in Kenya."},
            {"id": "c", "text": "Zwolle is a city in the Netherlands."},
            {"id": "d", "text": "Osmium has the atomic number 76."}]
    paths = np.array([[0, 0], [0, 0], [1, 2], [1, 3]])
    got = derive_preserve_prompts(docs, paths, seed=0)
    # each opening carries the name of an entity from another level-1 subtree, on the original document's path
    assert got and all(g["path"] in ([0, 0], [1, 2], [1, 3]) for g in got)
    first = next(g for g in got if g["path"] == [0, 0])
    assert "Kisumu" not in first["prompt"] and ("Zwolle" in first["prompt"] or "Osmium" in first["prompt"])
    assert not first["prompt"].endswith("Kenya")  # cut before the fact
    corpus_dir = tmp_path / "c"
    Corpus(docs=docs * 3).save(corpus_dir)
    t = Trainer(tiny_config(corpus_dir, tmp_path / "job", preserve_weight=1.0, preserve_per_doc=1,
                            branching=[2, 2]))
    assert t.preservation is not None and not t.preservation.source.rows
    t.build_prefix_cache()
    t.preservation.build()
    assert t.preservation.ready and t.preservation.data["source"] == "derived from the documents"
    # --preserve-per-doc 0 (the default): no derived prompts, steps without a KL term ...
    t0 = Trainer(tiny_config(corpus_dir, tmp_path / "job0", preserve_weight=1.0, preserve_per_doc=0))
    t0.build_prefix_cache()
    t0.preservation.build()
    assert not t0.preservation.ready and "kl" not in t0.step(t0._my_batches(0)[0])


def test_a_corpus_preserve_file_is_used_whatever_preserve_per_doc_says(corpus_dir, tmp_path):
    t = Trainer(tiny_config(corpus_dir, tmp_path / "job", preserve_weight=1.0, preserve_per_doc=0, loss="all"))
    t.build_prefix_cache()
    t.preservation.build()
    assert t.preservation.ready and t.preservation.data["source"] == "preserve.jsonl"
    assert "kl" in t.step(t._my_batches(0)[0])


def test_export_into_a_versioned_root_publishes_a_new_version(corpus_dir, tmp_path):
    from memory_store import Bank
    from memory_store.ops import init_version_root, list_versions
    from training.export import export_job

    info = train(tiny_config(corpus_dir, tmp_path / "job"))
    root = tmp_path / "root"
    init_version_root(info["bank"], root)
    first = Bank.open(root).bank_id
    export_job(tmp_path / "job", root)  # the same job again: a second version, the first untouched
    versions = list_versions(root)
    assert len(versions) == 2 and Bank.open(root).bank_id == first
    assert (root / "current").is_symlink()


def test_bfloat16_steps_store_the_frozen_weights_once_with_the_same_loss_and_restore_them(corpus_dir, tmp_path):
    t = Trainer(tiny_config(corpus_dir, tmp_path / "job", compute_dtype="bfloat16", loss="all"))
    _nonzero_memory(t)
    t.build_prefix_cache()
    batch = t._my_batches(0)[0]
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with torch.no_grad():
        cast_per_call = float(t.batch_loss(batch))
    saved = t.compute.store_frozen_weights(t.l0)
    converted = [m for m in t.model.model.layers[t.l0:].modules() if isinstance(m, torch.nn.Linear)]
    assert saved and set(saved) == set(converted)
    assert all(m.weight.dtype == torch.bfloat16 for m in converted)
    assert all(p.dtype == torch.float32 for p in t.model.model.layers[:t.l0].parameters())  # the prefix's
    with torch.no_grad():
        stored_once = float(t.batch_loss(batch))
    assert stored_once == cast_per_call  # autocast ran the same bfloat16 matmuls
    t.compute.restore_weights(saved)
    t.train()  # converts and restores around the loop
    for n, p in t.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_the_shared_block_trains_with_the_paths_it_joins_and_stays_out_of_the_bank(corpus_dir, tmp_path):
    """--shared-prob: a training-only block summed into paths; it gets gradients from the rows that carry
    it, and the job saves the tree's blocks (and the generic memory, when trained) only."""
    from safetensors.torch import load_file

    t = Trainer(tiny_config(corpus_dir, tmp_path / "j", loss="all", shared_prob=1.0, generic_prob=0.0))
    assert t.memory.shared is not None and any(t.memory.shared is p for p in t.params)
    t.build_prefix_cache()
    batch = t._my_batches(0)[0]
    _nonzero_memory(t, scale=0.2)
    t.memory.zero_grad(set_to_none=True)
    with_shared = t.batch_loss(batch)
    with_shared.backward()
    assert t.memory.shared.grad is not None and t.memory.shared.grad.abs().sum() > 0
    t.cfg.shared_prob = 0.0
    without = t.batch_loss(batch)
    assert abs(float(with_shared) - float(without)) > 1e-6  # the block is in the forward
    t.cfg.shared_prob = 1.0
    t.train()
    saved = load_file(str(t.out / "memory.safetensors"))
    # the tree's blocks only: no shared block, and no generic memory, which generic_prob 0 never trains
    assert "shared" not in saved and set(saved) == set(t.memory.nodes.keys())
    assert Trainer(tiny_config(corpus_dir, tmp_path / "k")).memory.shared is None
    with pytest.raises(ValueError, match="shared-prob"):
        Trainer(tiny_config(corpus_dir, tmp_path / "bad", shared_prob=1.5))


def test_permuted_views_train_each_document_again_with_its_sentences_reordered(docs_corpus, tmp_path):
    """--permuted-views: extra training sequences, each a document's sentences in another order, on the
    document's path; routing, the exported bank's documents and preservation keep the originals."""
    from memory_store.router import sentences
    from training.views import permuted_views

    docs = [{"id": "a", "text": "Essen lies in Germany. About 590,000 people live in Essen. It observes UTC+1."},
            {"id": "b", "text": "One sentence only."}]
    views, of = permuted_views(docs, 2, seed=0)
    assert of == [0, 0] and len({v["text"] for v in views}) == 2
    for v in views:
        assert v["text"] != docs[0]["text"] and sorted(sentences(v["text"])) == sorted(sentences(docs[0]["text"]))
    assert permuted_views(docs, 2, seed=0) == (views, of)  # seeded

    plain = Trainer(tiny_config(docs_corpus, tmp_path / "plain", loss="all", routing="tree",
                                skip_name_targets=False))
    t = Trainer(tiny_config(docs_corpus, tmp_path / "views", loss="all", routing="tree", permuted_views=1))
    n = len(t.docs)
    assert len(t.data) > n and len(t.data.paths) == len(t.data) and np.array_equal(t.paths, plain.paths)
    _, of = permuted_views(t.docs, 1, seed=0)
    assert np.array_equal(t.data.paths[n:], t.paths[of])
    assert t.batches_per_epoch > plain.batches_per_epoch
    t.train()
    assert t.prefix is not None and len(t.prefix.entries) == len(t.data)


def test_pronoun_views_follow_the_permuted_views_on_their_documents_paths(docs_corpus, tmp_path):
    """--pronoun-views: after the documents (and any permuted views), one view per document whose later
    sentences open with its name, trained on that document's path; routing keeps the documents."""
    from training.views import permuted_views, pronoun_views, subject_names

    plain = Trainer(tiny_config(docs_corpus, tmp_path / "plain", loss="all", routing="tree",
                                skip_name_targets=False))
    t = Trainer(tiny_config(docs_corpus, tmp_path / "both", loss="all", routing="tree", permuted_views=1,
                            pronoun_views=True))
    n = len(t.docs)
    perm, perm_of = permuted_views(t.docs, 1, seed=0)
    pron, pron_of = pronoun_views(t.docs, subject_names(t.docs))
    assert pron and np.array_equal(t.paths, plain.paths)
    assert len(t.data) == n + len(perm) + len(pron) == len(t.data.paths)
    assert np.array_equal(t.data.paths[n:n + len(perm)], t.paths[perm_of])
    assert np.array_equal(t.data.paths[n + len(perm):], t.paths[pron_of])


def test_skip_name_targets_leaves_every_mention_of_the_subject_out_of_the_loss(docs_corpus, tmp_path):
    """--skip-name-targets: the tokens of each training sequence's subject name (as `subject_names` finds
    it; every mention, also in the permuted views) are no loss targets; the other tokens still are."""
    from training.views import subject_names

    plain = Trainer(tiny_config(docs_corpus, tmp_path / "plain", loss="all", routing="tree",
                                skip_name_targets=False))
    t = Trainer(tiny_config(docs_corpus, tmp_path / "skip", loss="all", routing="tree", permuted_views=1,
                            skip_name_targets=True))
    assert plain.data.target_keep is None
    assert t.data.target_keep is not None and len(t.data.target_keep) == len(t.data)
    names = subject_names(t.docs)
    for i, name in enumerate(names):
        keep, ids = t.data.target_keep[i], t.data.token_ids[i]
        dropped = t.tokenizer.decode([x for x, k in zip(ids, keep.tolist(), strict=True) if not k])
        if name is None:
            assert keep.all()
            continue
        assert not keep.all() and keep.any()
        n_mentions = t.docs[i]["text"].count(name)
        assert dropped.replace(" ", "") == (name * n_mentions).replace(" ", "")  # exactly the mentions
    # the loss covers the other tokens: position j predicts token j + 1
    from training.data import pad_ids

    docs = [i for i, n in enumerate(names) if n][:3]
    ids, mask = pad_ids([t.data.token_ids[i] for i in docs])
    select, full = t.data.loss_select(docs, ids, mask), plain.data.loss_select(docs, ids, mask)
    for b, i in enumerate(docs):
        n = len(t.data.token_ids[i])
        assert select[b, :n - 1].tolist() == t.data.target_keep[i][1:].tolist() and not select[b, n - 1:].any()
        assert full[b, :n - 1].all()
    t.train()
