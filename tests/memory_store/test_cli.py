import argparse
import json

import numpy as np
import pytest

from memory_store import AnchorIdentity, Bank
from memory_store.cli import register


def main(argv: list[str], resolve_anchor=None) -> int:
    """Our subcommands alone (as hiermem.cli wires them), so other packages' CLIs cannot break these tests."""
    parser = argparse.ArgumentParser(prog="hiermem")
    register(parser.add_subparsers(dest="command"), resolve_anchor=resolve_anchor)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_synth_inspect_verify_delete_reshard(tmp_path, capsys):
    out = tmp_path / "bank"
    assert main(["bank", "synth", "--out", str(out), "--branching", "2,4", "--ranks", "8,4", "--layers", "all",
                 "--n-layers", "3", "--d-model", "16", "--dtype", "bfloat16", "--shards", "2", "--seed", "5"]) == 0
    bank = Bank.open(out)
    assert bank.spec.memory_layers == [0, 1, 2] and bank.spec.dtype == "bfloat16"
    assert len(bank.shard_ids) == 2 and bank.generic_block() is not None
    first_id = bank.bank_id
    assert bank.read_block((2, 3)).float().abs().max() > 0
    capsys.readouterr()

    assert main(["bank", "inspect", "--bank", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bank_id"] == first_id and [lv["nodes"] for lv in info["levels"]] == [2, 8]

    assert main(["bank", "verify", "--bank", str(out)]) == 0
    # a plain bank directory may be served: never rewritten in place
    assert main(["bank", "delete", "--bank", str(out), "--node", "2:3"]) == 2
    assert "never rewritten in place" in capsys.readouterr().err and Bank.open(out).bank_id == first_id
    root = tmp_path / "root"
    assert main(["bank", "init-root", "--bank", str(out), "--root", str(root)]) == 0
    assert main(["bank", "delete", "--bank", str(root), "--node", "2:3"]) == 0
    assert "roll them one by one" in capsys.readouterr().out
    deleted = Bank.open(root)
    assert deleted.bank_id != first_id and not deleted.is_present((2, 3))
    assert main(["bank", "reshard", "--bank", str(root), "--shards", "1"]) == 0
    assert Bank.open(root).bank_id == deleted.bank_id and len(Bank.open(root).shard_ids) == 1
    assert main(["bank", "inspect", "--bank", str(root)]) == 0
    text = capsys.readouterr().out
    assert "7 present" in text and "deleted   2:3" in text and "may hold what they held" in text
    assert main(["bank", "versions", "--bank", str(root), "--json"]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert len(versions) == 3 and versions[-1]["current"]
    assert main(["bank", "versions", "--bank", str(root), "--use", versions[0]["name"]]) == 0
    assert Bank.open(root).bank_id == first_id


def test_route_prints_paths_and_timing(tmp_path, capsys):
    out = tmp_path / "bank"
    assert main(["bank", "synth", "--out", str(out), "--preset", "tiny"]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("the atomic number of gold\n\nthe capital of France\n")
    capsys.readouterr()
    assert main(["route", "hello", "--file", str(prompts), "--bank", str(out), "--embedder", "hash-trigram",
                 "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines[:-1]] == ["hello", "the atomic number of gold", "the capital of France"]
    tree = Bank.open(out).tree
    from memory_store.embed import load_embedder

    emb = load_embedder("hash-trigram").embed(["hello"])
    assert lines[0]["path"] == tree.route(emb)[0].tolist()
    assert lines[-1]["summary"]["prompts"] == 3 and lines[-1]["summary"]["p50_ms"] > 0
    assert np.all([len(x["path"]) == 2 for x in lines[:-1]])


def test_paper_preset_is_made_for_the_served_anchor(tmp_path, capsys):
    """`bank synth --preset paper-smollm2` takes the smollm2 anchor's identity (the model server refused the
    synthetic one), depth and width; --anchor names another anchor, --anchor synthetic keeps the random one."""
    smollm2 = AnchorIdentity(arch="llama", hash="5" * 64)
    other = AnchorIdentity(arch="llama", hash="7" * 64)
    anchors = {"smollm2": (smollm2, 30, 576), "other": (other, 4, 64)}
    asked: list[str] = []

    def resolve(name):
        asked.append(name)
        return anchors[name]

    small = ["--branching", "2,2,2", "--ranks", "4,2,1", "--no-generic"]  # the paper's depth, not its size
    assert main(["bank", "synth", "--preset", "paper-smollm2", *small, "--out", str(tmp_path / "a")], resolve) == 0
    bank = Bank.open(tmp_path / "a")
    assert asked == ["smollm2"] and bank.anchor == smollm2
    assert bank.spec.memory_layers == list(range(30)) and bank.spec.d_model == 576
    assert "anchor smollm2 (llama 5555" in capsys.readouterr().out

    assert main(["bank", "synth", "--preset", "paper-smollm2", *small, "--anchor", "other",
                 "--out", str(tmp_path / "b")], resolve) == 0
    bank = Bank.open(tmp_path / "b")
    assert bank.anchor == other and bank.spec.n_layers == 4 and bank.spec.memory_layers == [0, 1, 2, 3]
    assert bank.spec.d_model == 64 and list(bank.spec.ranks) == [4, 2, 1]

    assert main(["bank", "synth", "--preset", "paper-smollm2", *small, "--anchor", "synthetic",
                 "--out", str(tmp_path / "c")], resolve) == 0
    assert Bank.open(tmp_path / "c").anchor.arch == "synthetic" and asked == ["smollm2", "other"]
    with pytest.raises(SystemExit, match="does not match anchor other"):
        main(["bank", "synth", "--anchor", "other", "--branching", "2", "--ranks", "4", "--d-model", "8",
              "--out", str(tmp_path / "d")], resolve)
    with pytest.raises(SystemExit, match="needs the `hiermem` command"):  # memory_store alone cannot load it
        main(["bank", "synth", "--preset", "paper-smollm2", *small, "--out", str(tmp_path / "e")])


def test_convert_to_int8_and_synth_an_int8_bank(tmp_path, capsys):
    from memory_store import NodeRef

    from .conftest import tiny_spec, write_bank

    write_bank(tmp_path / "f16", tiny_spec(dtype="float16"))
    assert main(["bank", "convert", "--bank", str(tmp_path / "f16"), "--dtype", "int8", "--out",
                 str(tmp_path / "q")]) == 0
    assert "blocks in int8" in capsys.readouterr().out
    q = Bank.open(tmp_path / "q")
    assert q.spec.dtype == "int8" and q.read_block(NodeRef(2, 5)).shape == (2, 3, 2, 8)
    assert main(["bank", "synth", "--out", str(tmp_path / "s"), "--branching", "2,2", "--ranks", "4,2", "--layers",
                 "all", "--n-layers", "2", "--d-model", "16", "--dtype", "int8"]) == 0
    s = Bank.open(tmp_path / "s")
    assert s.spec.dtype == "int8" and s.read_block(NodeRef(2, 3)).abs().max() > 0 and s.generic_block() is not None
    assert main(["bank", "verify", "--bank", str(tmp_path / "s")]) == 0
