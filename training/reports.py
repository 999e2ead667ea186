"""The long-tail evaluation's reports: longtail.json, longtail.md (tables) and longtail.png (a chart)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHART_SYSTEMS = ("anchor", "generic", "hierarchical", "rag1", "rag3")
COLORS = {"anchor": "#4c72b0", "generic": "#dd8452", "hierarchical": "#55a868", "rag1": "#8172b3", "rag3": "#c44e52"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    buckets = [str(b) for b in result["buckets"]]
    lines = []
    for sp in ("train", "heldout"):
        lines += [f"### {sp} facts (n = {result['n'][sp]}), exact match %, bucket 1 = most popular", "",
                  "| system | all | " + " | ".join(f"bucket {b}" for b in buckets) + " |",
                  "|---|---|" + "---|" * len(buckets)]
        for s, acc in result["accuracy"].items():
            lines.append(f"| {s} | {_pct(acc[sp]['all'])} | " + " | ".join(_pct(acc[sp][b]) for b in buckets)
                         + " |")
        lines.append("")
    lines.append(f"Held-out facts the anchor knew: {result['heldout_anchor_known']}; broken by memory: "
                 + ", ".join(f"{s} {v['count']} ({_pct(v['fraction'])}%)" for s, v in result["broken"].items()))
    r = result.get("routing")
    if r:
        lines += ["", f"### Routing ({r['router']})", "",
                  f"Trained facts whose prompt reached a leaf trained on the fact: **{_pct(r['reached'])}%** "
                  f"(level 1: {_pct(r['reached_level1'])}%); gate closed for {_pct(r['gated_train'])}% of "
                  f"trained-fact prompts and {_pct(r['gated_heldout'])}% of held-out-fact prompts.", "",
                  "| system | reached: exact match % | missed: exact match % |", "|---|---|---|"]
        for s, v in r["accuracy_by_route"].items():
            lines.append(f"| {s} | {_pct(v['reached'])} (n = {v['n_reached']}) | {_pct(v['missed'])} "
                         f"(n = {v['n_missed']}) |")
    cost = result.get("cost")
    if cost:
        lines += ["", "### Cost per probe", "", "| system | extra prompt tokens | ms per probe |", "|---|---|---|"]
        for s, v in cost.items():
            lines.append(f"| {s} | {v['extra_prompt_tokens']:.1f} | {v['ms_per_probe']:.1f} |")
    g = result.get("general")
    if g:
        lines += ["", f"### General use (n = {g['n']} everyday prompts and chat turns not about the corpus)", "",
                  "| memory | first 8 greedy tokens identical to memory off | mean KL(off ‖ memory) per position "
                  "(nats) | prompts given memory |", "|---|---|---|---|"]
        for name, v in g["systems"].items():
            lines.append(f"| {name} | {_pct(v['identical'])}% | {v['mean_kl']:.4f} | {_pct(v['memory_share'])}% |")
    d = result.get("deletion")
    if d:
        lines += ["", f"Deletion of level-1 subtree {d['subtree']}: trained facts routed there "
                      f"(n = {d['n_inside']}) vs the rest (n = {d['n_rest']}), exact match %", "",
                  "| facts | anchor | hierarchical | after deletion |", "|---|---|---|---|"]
        for k in ("inside", "rest"):
            lines.append(f"| {k} | {_pct(d[k]['anchor'])} | {_pct(d[k]['hierarchical'])} | "
                         f"{_pct(d[k]['hierarchical_deleted'])} |")
    text = "\n".join(lines) + "\n"
    if result.get("chat"):
        from training.chat_eval import chat_markdown

        text += "\n" + chat_markdown(result["chat"])
    return text


def bar_chart(result: dict, path: Path) -> None:
    """Accuracy on trained facts by bucket, one bar per system; for the hierarchical memory the bar is split
    into facts whose prompt reached a leaf trained on them (solid) and those routed elsewhere (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [str(b) for b in result["buckets"]]
    systems = [s for s in CHART_SYSTEMS if s in result["accuracy"]]
    split = (result.get("routing") or {}).get("by_bucket", {})
    fig, ax = plt.subplots(figsize=(10, 4.8))
    w = 0.8 / len(systems)
    x = np.arange(len(buckets) + 1)
    for k, s in enumerate(systems):
        acc = result["accuracy"][s]["train"]
        vals = np.array([100 * (acc[b] or 0) for b in buckets] + [100 * (acc["all"] or 0)])
        pos = x + (k - (len(systems) - 1) / 2) * w
        if s == "hierarchical" and split:
            right = np.array([100 * split[b]["correct_reached"] for b in buckets] + [100 * split["all"]["correct_reached"]])
            ax.bar(pos, right, w, label="hierarchical, routed to its fact's leaf", color=COLORS[s])
            bars = ax.bar(pos, vals - right, w, bottom=right, label="hierarchical, routed elsewhere",
                          color=COLORS[s], alpha=0.4, hatch="//")
        else:
            bars = ax.bar(pos, vals, w, label={"rag1": "rag, top-1 document", "rag3": "rag, top-3 documents"}
                          .get(s, s), color=COLORS.get(s))
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=6, padding=1)  # the bar's total
    ax.set_xticks(x, [f"bucket {b}" for b in buckets] + ["all"])
    ax.set_ylabel("exact match on trained facts (%)")
    ax.set_ylim(0, 108)
    ax.set_title("Long-tail facts by popularity bucket (1 = most popular, higher = rarer)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict, out_dir: Path) -> None:
    per_probe = result.pop("per_probe", None)
    if per_probe is not None:
        with open(out_dir / "probes.jsonl", "w") as f:
            for row in per_probe:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "longtail.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "longtail.md").write_text("# Long-tail evaluation\n\n" + markdown(result))
    bar_chart(result, out_dir / "longtail.png")
