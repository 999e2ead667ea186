import subprocess
import sys

from hiermem.cli import build_parser


def test_help_lists_commands_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "hiermem.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: hiermem" in out.stdout


def test_no_command_prints_help_and_fails():
    from hiermem.cli import main

    assert main([]) == 2
    assert build_parser().prog == "hiermem"


def test_bank_synth_for_an_anchor_is_accepted_by_the_model_server(tmp_path):
    """`hiermem bank synth --anchor tiny` (the wiring of hiermem.cli: lm loads the anchor) records the anchor's
    identity, so the model server's identity check passes; the paper preset asks for smollm2 by default."""
    from unittest import mock

    import hiermem.cli as cli
    from lm import load_anchor
    from memory_store import Bank

    out = tmp_path / "bank"
    assert cli.main(["bank", "synth", "--anchor", "tiny", "--branching", "2,2", "--ranks", "4,2", "--layers", "all",
                 "--out", str(out)]) == 0
    anchor = load_anchor("tiny")
    bank = Bank.open(out)
    bank.check_anchor(anchor.identity)  # raises BankMismatch for another anchor
    assert bank.spec.n_layers == anchor.config.n_layers and bank.spec.d_model == anchor.config.d_model

    asked = []

    def tiny_instead(name):
        asked.append(name)
        return cli.anchor_for_bank("tiny")

    with mock.patch.dict(cli.WIRING, {"memory_store.cli": {"resolve_anchor": tiny_instead}}):
        assert cli.main(["bank", "synth", "--preset", "paper-smollm2", "--branching", "2,2,2", "--ranks", "4,2,1",
                     "--out", str(tmp_path / "paper")]) == 0
    assert asked == ["smollm2"]
    Bank.open(tmp_path / "paper").check_anchor(anchor.identity)
