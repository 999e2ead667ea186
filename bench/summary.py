"""The README's benchmark table, built from every `bench/results/<name>.json`.

`python -m bench.summary` prints it; `python -m bench.summary --write-readme` replaces the block between
the `<!-- bench:start -->` and `<!-- bench:end -->` markers of README.md. `tests/test_readme.py` checks
that README shows what the results files say.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = ("decode", "peers", "bank", "route", "fetch", "serve", "longtail")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary(results_dir: Path = RESULTS_DIR) -> str:
    docs: dict[str, dict[str, Any]] = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    names = [n for n in ORDER if n in docs] + sorted(n for n in docs if n not in ORDER)
    out = ["| benchmark | target | value | goal | met | run |", "|---|---|---|---|---|---|"]
    for name in names:
        doc = docs[name]
        date = str(doc.get("machine", {}).get("date", ""))[:16]
        for t in doc.get("targets", []):
            out.append(f"| [{name}](bench/results/{name}.md) | {t['name']} | {_fmt(t['value'])} | "
                       f"{t['op']} {_fmt(t['target'])} | {'yes' if t['met'] else '**NO**'} | {date} |")
    m = next(iter(docs.values()), {}).get("machine", {})
    out.append("")
    out.append(f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
               f"torch {m.get('torch')}, Python {m.get('python')}; shared with other work while measured, "
               "so every figure is a ratio or a side-by-side measurement from one run (see each file).")
    return "\n".join(out) + "\n"


def readme_block(text: str) -> str:
    start, end = text.index(START), text.index(END)
    return text[start + len(START):end].strip("\n") + "\n"


def write_readme(readme: Path = README) -> None:
    text = readme.read_text()
    start, end = text.index(START), text.index(END)
    readme.write_text(text[:start + len(START)] + "\n" + summary() + text[end:])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    if args.write_readme:
        write_readme()
    else:
        print(summary(), end="")
