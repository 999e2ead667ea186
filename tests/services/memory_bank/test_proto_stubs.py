"""The committed stubs are exactly what scripts/gen_proto.sh makes from the proto: they cannot drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GEN = ROOT / "services" / "memory_bank" / "_gen"


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    fresh = {p.name for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name for p in GEN.iterdir() if p.is_file()}
    assert fresh == committed
    for name in sorted(fresh - {"__init__.py"}):
        assert (tmp_path / name).read_text() == (GEN / name).read_text(), f"{name} is stale: run gen_proto.sh"


def test_stubs_describe_the_service():
    from services.memory_bank._gen import memory_bank_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["MemoryBank"]
    assert service.full_name == "hiermem.v1.MemoryBank"
    assert {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods} == {
        "GetInfo": ("GetInfoRequest", "GetInfoResponse", False),
        "FetchBlocks": ("FetchBlocksRequest", "BlockChunk", True),
    }
