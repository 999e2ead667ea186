"""Draws docs/architecture.png, the one-page picture of hiermem's processes (README, docs/design.md §2).

    .venv/bin/python scripts/draw_architecture.py        # rewrites docs/architecture.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.png"
COLORS = {"client": "#f2f2f2", "model": "#d6e6fa", "shard": "#d9f0d3", "redis": "#fadadd",
          "train": "#fde7c8", "bank": "#e6def5", "cli": "#fbf6cf"}


def box(ax, x, y, w, h, color, title, package, lines=(), stacked=False):
    """A process (or the bank files): title, its package in monospace, a few lines of what it does."""
    if stacked:  # replicas: two shadows behind the box
        for k in (2, 1):
            ax.add_patch(FancyBboxPatch((x + 0.8 * k, y - 0.8 * k), w, h, boxstyle="round,pad=0.3",
                                        fc=color, ec="#555555", lw=0.8))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3", fc=color, ec="#333333", lw=1.2))
    ax.text(x + w / 2, y + h - 1.6, title, ha="center", va="top", fontsize=11.5, weight="bold")
    ax.text(x + w / 2, y + h - 4.4, package, ha="center", va="top", fontsize=9, family="monospace",
            color="#333333")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 7.6 - 2.6 * i, line, ha="center", va="top", fontsize=8.8)


def label(ax, x, y, text):
    ax.text(x, y, text, ha="center", va="center", fontsize=8.8, style="italic",
            bbox=dict(fc="white", ec="none", alpha=0.9, pad=1.2))


def arrow(ax, start, end, text="", *, both=False, rad=0.0, label_at=0.5, dx=0.0, dy=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=14,
                                 lw=1.6, color="#222222", connectionstyle=f"arc3,rad={rad}"))
    if text:
        label(ax, start[0] + (end[0] - start[0]) * label_at + dx, start[1] + (end[1] - start[1]) * label_at + dy,
              text)


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 8))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 66)
    ax.axis("off")

    box(ax, 1, 49, 17, 12, COLORS["client"], "clients", "OpenAI SDK, curl",
        ["completions, chat,", "TGI generate"])
    box(ax, 28, 41, 40, 21, COLORS["model"], "model server", "services/model_server  (FastAPI)",
        ["route: MiniLM embedding -> tree / document router",
         "block cache: pinned shallow levels + byte-bounded LRU",
         "engine thread: continuous batching, anchor + FFN-memory (lm/)",
         "API keys per tenant and subtree, limits, /metrics"])
    box(ax, 80, 50, 18, 11, COLORS["redis"], "Redis", "discovery",
        ["hiermem:bank:<id>:replica:*"])
    box(ax, 33, 17, 15, 11, COLORS["shard"], "bank shard 0", "services/memory_bank",
        ["x R replicas (gRPC)"], stacked=True)
    box(ax, 54, 17, 15, 11, COLORS["shard"], "bank shard 1", "services/memory_bank",
        ["x R replicas (gRPC)"], stacked=True)
    box(ax, 27, 1, 44, 10, COLORS["bank"], "bank files", "memory_store (format, tree, router)",
        ["manifest.json  tree.safetensors  shards/<id>/level-<l>.safetensors"])
    box(ax, 1, 1, 19, 17, COLORS["train"], "offline pipeline", "training/  (hiermem build)",
        ["corpus -> MiniLM -> tree", "train blocks on the", "frozen anchor -> export", "-> long-tail eval"])
    box(ax, 79, 8, 19, 27, COLORS["cli"], "launcher", "hiermem/  +  deploy/",
        ["hiermem up: starts and", "supervises redis, shards", "and the model server",
         "(compose, Kubernetes:", "the same roles)", "base/: paths, logging,", "settings -> flags"])

    arrow(ax, (18.6, 55), (27.6, 55), "HTTP / SSE", both=True, dy=1.6)
    arrow(ax, (38, 40.6), (38, 28.6), both=True)
    arrow(ax, (62, 40.6), (62, 28.6), both=True)
    label(ax, 50, 34.6, "gRPC FetchBlocks: blocks in ~1 MiB\nchunks, crc32c-checked; one call\n"
          "per shard, failover between replicas")
    arrow(ax, (69.5, 22), (80.5, 50), "register: TTL 10 s,\nheartbeat 3 s", rad=0.15, label_at=0.4,
          dx=-1)
    arrow(ax, (79.6, 56), (68.4, 56), "replica list\n(SCAN every 2 s)", dy=2.2)
    arrow(ax, (20.4, 6), (26.6, 6), "writes\n(atomic)", dy=4.2)
    arrow(ax, (44, 11.4), (40.5, 15.6), "mmap", dx=-2.6)
    arrow(ax, (56, 11.4), (61.5, 15.6), "mmap", dx=2.6)
    arrow(ax, (29.5, 11.4), (30, 40.6), "manifest + tree\n+ router at start", label_at=0.45, dx=-4.5)

    ax.text(50, 65.5, "hiermem: the processes and what flows between them", ha="center", va="top",
            fontsize=14, weight="bold")
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(OUT)


if __name__ == "__main__":
    main()
