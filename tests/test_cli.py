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
