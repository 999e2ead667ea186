"""What a bank is: its layout (BankSpec), the anchor it belongs to, and node references."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memory_store.errors import InvalidSpec

DType = Literal["float32", "float16", "bfloat16", "int8"]
BYTES_PER_PARAM: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# safetensors dtype tags
ST_DTYPE: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8"}
ROW_SCALE_BYTES: dict[str, int] = {"int8": 4}
"""Bytes stored after each row of `d` values: an int8 row's float32 scale (memory_store/quant.py)."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, InvalidSpec):
            parts.append(str(inner))
        else:
            loc = ".".join(str(x) for x in err.get("loc", ())) or "spec"
            parts.append(f"{loc}: {err.get('msg')}")
    return "invalid bank spec: " + "; ".join(parts)


class NodeRef(NamedTuple):
    """A tree node: `level` in 1..depth, `index` within its level (0..n_level-1)."""

    level: int
    index: int  # type: ignore[assignment]  # shadows tuple.index; the contract names it so

    def __str__(self) -> str:
        return f"{self.level}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> NodeRef:
        """Parse `"L:I"` (as printed by str())."""
        try:
            level, index = text.split(":")
            return cls(int(level), int(index))
        except ValueError as exc:
            raise InvalidSpec(f"node ref must look like LEVEL:INDEX, got {text!r}") from exc


def path_refs(path) -> list[NodeRef]:
    """The NodeRefs of a path `(i1, ..., ip)` (one index per level, level 1 first)."""
    return [NodeRef(level, int(index)) for level, index in enumerate(path, start=1)]


class AnchorIdentity(BaseModel):
    """Which anchor a bank was built for: architecture name + hash of its config and weights."""

    model_config = ConfigDict(frozen=True)

    arch: str
    hash: str


class BankSpec(BaseModel):
    """Layout of a bank (docs/design.md §3). Validation raises InvalidSpec with the field and the reason."""

    model_config = ConfigDict(frozen=True)

    branching: list[int] = Field(description="children per node, one entry per level (16,16,16 in the paper)")
    ranks: list[int] = Field(description="memory units r_l per block, one per level")
    memory_layers: list[int] = Field(description="anchor layer indices that carry memory, increasing")
    n_layers: int = Field(description="anchor depth, to validate memory_layers")
    d_model: int = Field(description="anchor hidden size d")
    dtype: DType = "float16"
    embedder_name: str = "all-MiniLM-L6-v2"
    embedder_dim: int = 384
    shard_level: int = 1
    allow_increasing_ranks: bool = False

    def __init__(self, **data) -> None:
        # pydantic wraps validator errors in ValidationError; callers get one named error, InvalidSpec.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidSpec(_describe(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> BankSpec:
        if not self.branching:
            raise InvalidSpec("branching must list at least one level")
        if any(k < 1 for k in self.branching):
            raise InvalidSpec(f"branching must be >= 1 per level, got {self.branching}")
        if len(self.ranks) != len(self.branching):
            raise InvalidSpec(f"ranks has {len(self.ranks)} entries but branching has {len(self.branching)} "
                              "levels: give one rank per level")
        if any(r < 1 for r in self.ranks):
            raise InvalidSpec(f"ranks must be >= 1, got {self.ranks}")
        if not self.allow_increasing_ranks and any(b > a for a, b in zip(self.ranks, self.ranks[1:], strict=False)):
            raise InvalidSpec(f"ranks must be non-increasing with depth, got {self.ranks} "
                              "(set allow_increasing_ranks=True to allow it)")
        if self.n_layers < 1 or self.d_model < 1 or self.embedder_dim < 1:
            raise InvalidSpec("n_layers, d_model and embedder_dim must be positive")
        if not self.memory_layers:
            raise InvalidSpec("memory_layers must list at least one anchor layer")
        bad = [i for i in self.memory_layers if not 0 <= i < self.n_layers]
        if bad:
            raise InvalidSpec(f"memory_layers {bad} are outside the anchor's layers 0..{self.n_layers - 1}")
        if list(self.memory_layers) != sorted(set(self.memory_layers)):
            raise InvalidSpec(f"memory_layers must be strictly increasing, got {self.memory_layers}")
        if not 1 <= self.shard_level <= len(self.branching):
            raise InvalidSpec(f"shard_level must be in 1..{len(self.branching)}, got {self.shard_level}")
        return self

    # Derived figures
    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def n_mem_layers(self) -> int:
        return len(self.memory_layers)

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= self.depth:
            raise InvalidSpec(f"level must be in 1..{self.depth}, got {level}")

    def nodes_at(self, level: int) -> int:
        self._check_level(level)
        return math.prod(self.branching[:level])

    def block_shape(self, level: int) -> tuple[int, int, int, int]:
        """[L_mem, 3, r_l, d]: gate, up, down-transposed."""
        self._check_level(level)
        return (self.n_mem_layers, 3, self.ranks[level - 1], self.d_model)

    def params_per_block(self, level: int) -> int:
        return math.prod(self.block_shape(level))

    def params_at_level(self, level: int) -> int:
        return self.params_per_block(level) * self.nodes_at(level)

    @property
    def bytes_per_param(self) -> int:
        return BYTES_PER_PARAM[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one row of `d` values (an int8 row carries its scale after it)."""
        return self.d_model * self.bytes_per_param + ROW_SCALE_BYTES.get(self.dtype, 0)

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a block of logical `shape` (`[..., d]`) has in the shard files: `[..., d + 4]` int8 for
        an int8 bank, the same shape otherwise."""
        return (*shape[:-1], shape[-1] + ROW_SCALE_BYTES[self.dtype]) if self.dtype in ROW_SCALE_BYTES else tuple(shape)

    def bytes_per_block(self, level: int) -> int:
        return self.params_per_block(level) // self.d_model * self.row_bytes

    @property
    def fetched_params(self) -> int:
        """Parameters of one path (one block per level)."""
        return sum(self.params_per_block(level) for level in range(1, self.depth + 1))

    @property
    def bank_params(self) -> int:
        return sum(self.params_at_level(level) for level in range(1, self.depth + 1))

    @property
    def bank_bytes(self) -> int:
        return sum(self.bytes_per_block(level) * self.nodes_at(level) for level in range(1, self.depth + 1))

    @property
    def fetched_bytes(self) -> int:
        """Stored bytes of one path (one block per level)."""
        return sum(self.bytes_per_block(level) for level in range(1, self.depth + 1))

    @property
    def generic_shape(self) -> tuple[int, int, int, int]:
        """Shape of the generic memory: the size of one fetched path."""
        return (self.n_mem_layers, 3, sum(self.ranks), self.d_model)

    def check_ref(self, ref: NodeRef) -> NodeRef:
        """Validate a node ref against the layout (InvalidSpec if out of range)."""
        level, index = int(ref[0]), int(ref[1])
        self._check_level(level)
        if not 0 <= index < self.nodes_at(level):
            raise InvalidSpec(f"node index {index} out of range 0..{self.nodes_at(level) - 1} at level {level}")
        return NodeRef(level, index)
