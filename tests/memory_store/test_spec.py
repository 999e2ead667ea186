import pytest

from memory_store import BankSpec, InvalidSpec, NodeRef, path_refs

from .conftest import tiny_spec


def test_derived_sizes_of_the_paper_bank():
    spec = BankSpec(branching=[16, 16, 16], ranks=[256, 64, 16], memory_layers=list(range(30)), n_layers=30,
                    d_model=576, dtype="float16")
    assert spec.depth == 3
    assert [spec.nodes_at(lv) for lv in (1, 2, 3)] == [16, 256, 4096]
    assert spec.block_shape(1) == (30, 3, 256, 576)
    assert spec.params_per_block(3) == 30 * 3 * 16 * 576
    assert spec.fetched_params == 30 * 3 * (256 + 64 + 16) * 576
    assert spec.bank_params == 30 * 3 * 576 * (16 * 256 + 256 * 64 + 4096 * 16)  # about 4.46B
    assert 8.9e9 < spec.bank_bytes < 9.0e9
    assert spec.generic_shape == (30, 3, 336, 576)


@pytest.mark.parametrize("overrides, message", [
    (dict(ranks=[2, 4]), "non-increasing"),
    (dict(ranks=[4]), "one rank per level"),
    (dict(memory_layers=[0, 3]), "outside the anchor's layers"),
    (dict(memory_layers=[2, 0]), "strictly increasing"),
    (dict(memory_layers=[]), "at least one"),
    (dict(dtype="int4"), "dtype"),
    (dict(branching=[2, 0]), "branching"),
    (dict(shard_level=3), "shard_level"),
    (dict(d_model=0), "positive"),
])
def test_invalid_specs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(InvalidSpec, match=message):
        tiny_spec(**overrides)


def test_increasing_ranks_allowed_when_asked():
    assert tiny_spec(ranks=[2, 4], allow_increasing_ranks=True).ranks == [2, 4]


def test_spec_json_round_trip_and_refs(spec):
    assert BankSpec.model_validate_json(spec.model_dump_json()) == spec
    assert path_refs((1, 4)) == [NodeRef(1, 1), NodeRef(2, 4)]
    assert NodeRef.parse("2:5") == NodeRef(2, 5) and str(NodeRef(2, 5)) == "2:5"
    with pytest.raises(InvalidSpec):
        NodeRef.parse("2-5")
    with pytest.raises(InvalidSpec, match="out of range"):
        spec.check_ref(NodeRef(2, 6))
    with pytest.raises(InvalidSpec, match="level"):
        spec.check_ref(NodeRef(3, 0))
