"""`hiermem generate`: one completion from an anchor, optionally with a synthetic memory path."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a completion with an anchor (and a memory path)",
                              description=__doc__)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--anchor", default="smollm2", help="smollm2 | tiny | path to a HF Llama directory")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the anchor's chat template")
    p.add_argument("--synthetic-memory", action="store_true",
                   help="inject a random memory path of the paper's proportion: r = (256, 64, 16) units on "
                        "every layer, small random gate/up, small random M_down")
    p.add_argument("--memory-seed", type=int, default=0, help="seed of the synthetic memory path")
    p.add_argument("--threads", default=os.environ.get("HIERMEM_THREADS", "auto"),
                   help="torch threads, or 'auto' (env HIERMEM_THREADS): the cores not busy with other work "
                        "(1-minute load average), at least 1; on a shared machine a thread team waiting for a "
                        "descheduled member is slower than one thread")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from lm import MemoryBatch, SamplingParams, generate, load_anchor
    from lm.dtype import pick_threads
    from lm.model import ffn_param_count
    from lm.synthetic import PAPER_RANKS, random_path

    torch.set_num_threads(pick_threads(args.threads))
    anchor = load_anchor(args.anchor)
    tok = anchor.tokenizer
    if args.chat:
        if not anchor.chat_template:
            raise SystemExit(f"anchor {anchor.name} has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True,
                                      add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(args.prompt).input_ids
    memory, mem_line = None, "memory: none (anchor only)"
    if args.synthetic_memory:
        blocks, layers = random_path(anchor.config, PAPER_RANKS, seed=args.memory_seed)
        memory = MemoryBatch.build(blocks, [list(range(len(blocks)))], layers, dtype=anchor.model.dtype)
        n = memory.distinct_params
        mem_line = (f"memory: SYNTHETIC random path r={PAPER_RANKS} on all {len(layers)} layers = "
                    f"{n / 1e6:.1f}M params ({memory.distinct_nbytes / 1e6:.1f} MB float32), "
                    f"{n / anchor.model.config.n_params:.1%} of the anchor, "
                    f"{n / ffn_param_count(anchor.config):.0%} of its FFNs (random values: not knowledge)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    with torch.inference_mode():
        out = generate(anchor.model, tok, ids, params, memory=memory)
    n_params = sum(p.numel() for p in anchor.model.parameters())
    print(f"anchor: {anchor.name} ({n_params / 1e6:.1f}M params, identity {anchor.identity['hash'][:12]})")
    print(mem_line)
    print(f"prompt: {args.prompt!r}")
    print(f"completion: {out.text!r}")
    print(f"tokens: {out.prompt_tokens} prompt + {len(out.token_ids)} generated ({out.finish_reason}); "
          f"prefill {out.prefill_s * 1e3:.0f} ms, decode {out.tokens_per_s:.1f} tokens/s "
          f"(torch threads: {torch.get_num_threads()})")
    return 0
