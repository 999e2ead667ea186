"""Export trained memories as a memory_store bank, and merge per-subtree jobs into one bank."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

def _job(job_dir: Path) -> dict:
    f = Path(job_dir) / "job.json"
    if not f.exists():
        raise FileNotFoundError(f"{job_dir} has no job.json: the training job has not finished")
    return json.loads(f.read_text())


def bank_spec(job: dict, dtype: str):
    from memory_store import BankSpec

    return BankSpec(branching=job["branching"], ranks=job["ranks"], memory_layers=job["memory_layers"],
                    n_layers=job["n_layers"], d_model=job["d_model"], dtype=dtype,
                    embedder_name=job.get("embedder", "all-MiniLM-L6-v2"),
                    embedder_dim=job.get("embedder_dim", 384), allow_increasing_ranks=True)


# what a job's settings say about that job alone (its files, its part of the tree), not how to train
JOB_OWN_FIELDS = ("corpus", "out", "bank", "tree", "subtree", "max_docs", "progress", "threads")


def save_documents(job_dir: Path, docs: Sequence[dict], paths: np.ndarray, cfg, layers: Sequence[int]) -> None:
    """documents.jsonl (each document with the path it was trained into) and training.json (the settings
    without the job's own paths), which the bank carries so that `hiermem bank update` can retrain a leaf on
    the documents it holds with the settings that made it (training/update.py)."""
    from memory_store.layout import DOCUMENTS_FILE, TRAINING_FILE
    from training.corpus import write_jsonl

    keep = ("id", "text", "route_text", "source")
    write_jsonl(Path(job_dir) / DOCUMENTS_FILE, ({**{k: d[k] for k in keep if k in d},
                                                  "path": [int(x) for x in paths[i]]} for i, d in enumerate(docs)))
    settings = {k: v for k, v in cfg.model_dump().items() if k not in JOB_OWN_FIELDS}
    (Path(job_dir) / TRAINING_FILE).write_text(json.dumps({**settings, "memory_layers": list(layers)}, indent=2) + "\n")


def job_files(job_dir: Path) -> list[Path]:
    """The job's files a bank carries beside its blocks: its documents (with their paths) and its settings,
    which `hiermem bank update` reads (training/update.py)."""
    from memory_store.layout import DOCUMENTS_FILE, TRAINING_FILE

    return [f for f in (Path(job_dir) / DOCUMENTS_FILE, Path(job_dir) / TRAINING_FILE) if f.exists()]


def _write_bank(bank_dir: Path, job: dict, tree, tensors: dict[str, torch.Tensor],
                generic: torch.Tensor | None, n_shards: int, dtype: str, router_dir: Path | None = None,
                files: Sequence[Path] = ()) -> str:
    """Every node's block (zeros for a node no job trained: a zero block changes nothing) + the generic
    (none when the job did not train one: `--generic-prob 0`), and the job's nearest-document router
    (memory_store.router) when it has one, and `files` (job_files) beside them. A plain directory is replaced
    atomically; a versioned bank root (docs/operating.md) gets a new version, `current` moved."""
    import shutil

    from memory_store import BankWriter, NodeRef
    from memory_store.bank import is_version_root
    from memory_store.router import DocRouter

    if is_version_root(bank_dir):  # a served, versioned root: publish the next version, touch nothing served
        import tempfile

        from memory_store.ops import add_version

        with tempfile.TemporaryDirectory(prefix=".export-", dir=bank_dir) as tmp:
            bank_id = _write_bank(Path(tmp) / "bank", job, tree, tensors, generic, n_shards, dtype, router_dir,
                                  files)
            name = add_version(Path(tmp) / "bank", bank_dir)
        log.info("published as version %s of %s", name, bank_dir)
        return bank_id
    spec = bank_spec(job, dtype)
    with BankWriter(bank_dir, spec, job["anchor_identity"], tree, n_shards, overwrite=True) as w:
        for level in range(1, spec.depth + 1):
            shape = spec.block_shape(level)
            for index in range(spec.nodes_at(level)):
                block = tensors.get(f"{level}_{index}")
                w.write_block(NodeRef(level, index), block if block is not None else torch.zeros(shape))
        if generic is not None:
            w.write_generic(generic)
        if router_dir is not None:
            DocRouter.copy_files(router_dir, w.tmp)  # inside the temporary directory: published together
        for f in files:
            shutil.copyfile(f, w.tmp / Path(f).name)
    log.info("exported bank %s (%d shard(s), %s) to %s", w.bank_id[:12], n_shards, dtype, bank_dir)
    return w.bank_id


def export_job(job_dir: Path, bank_dir: Path, n_shards: int = 1, dtype: str = "float32") -> str:
    """Write the bank of one finished (whole-tree) job. Returns its bank_id."""
    from safetensors.torch import load_file

    from memory_store import Tree

    job_dir = Path(job_dir)
    job = _job(job_dir)
    tensors = load_file(str(job_dir / "memory.safetensors"))
    generic = tensors.pop("generic", None)  # absent when the job trained none (--generic-prob 0)
    return _write_bank(Path(bank_dir), job, Tree.load(job_dir / "tree.safetensors"), tensors, generic,
                       n_shards, dtype, router_dir=job_dir / "router", files=job_files(job_dir))


def merge_subtree_jobs(job_dirs: list[Path], bank_dir: Path, n_shards: int = 1, dtype: str = "float32") -> str:
    """One bank from independent per-level-1-subtree jobs (`hiermem train --subtree I`).

    The jobs must share the tree, the spec and the anchor. Each subtree's blocks come from the job that
    trained it (two jobs of the same subtree are an error); the generic memory is the average of the jobs'
    generic memories weighted by their documents (each job trained it on its own subtree's documents only).
    """
    from safetensors.torch import load_file

    from memory_store import Tree

    jobs = [_job(Path(j)) for j in job_dirs]
    trees = [Tree.load(Path(j) / "tree.safetensors") for j in job_dirs]
    for j, tree, path in zip(jobs[1:], trees[1:], job_dirs[1:], strict=True):
        same_tree = all(np.array_equal(a, b) for a, b in zip(tree.centroids, trees[0].centroids, strict=True))
        if not same_tree:
            raise ValueError(f"{path}: tree differs from {job_dirs[0]}'s (build the tree once, pass --tree)")
        for key in ("branching", "ranks", "memory_layers", "d_model", "anchor_identity"):
            if j[key] != jobs[0][key]:
                raise ValueError(f"{path}: {key} {j[key]} differs from {jobs[0][key]}")
    seen: dict[int, Path] = {}
    tensors: dict[str, torch.Tensor] = {}
    generic: torch.Tensor | None = None
    weight = 0
    for job, path in zip(jobs, job_dirs, strict=True):
        if job.get("subtree") is None:
            raise ValueError(f"{path} is not a subtree job (it was trained with the whole tree)")
        if job["subtree"] in seen:
            raise ValueError(f"subtree {job['subtree']} trained twice: {seen[job['subtree']]} and {path}")
        seen[job["subtree"]] = Path(path)
        t = load_file(str(Path(path) / "memory.safetensors"))
        g = t.pop("generic", None)
        if g is None:
            raise ValueError(f"{path} trained no generic memory (--generic-prob 0): merge jobs that all have one")
        n = max(1, int(job.get("n_docs_trained", 1)))
        generic = g * n if generic is None else generic + g * n
        weight += n
        tensors.update(t)
    if generic is None:
        raise ValueError("no subtree jobs to merge")
    log.info("merging subtrees %s", sorted(seen))
    # every subtree job routed all documents over the shared tree: their routers are the same
    return _write_bank(Path(bank_dir), jobs[0], trees[0], tensors, generic / weight, n_shards, dtype,
                       router_dir=Path(job_dirs[0]) / "router", files=job_files(Path(job_dirs[0])))
