"""memory_store: the memory bank as data — spec, cluster tree and routing, on-disk shards, synthetic banks."""

from memory_store.bank import Bank, BlockInfo
from memory_store.embed import Embedder, MiniLMEmbedder, load_embedder
from memory_store.errors import BankError, BankMismatch, BlockCorrupt, InvalidSpec, NodeNotFound
from memory_store.spec import AnchorIdentity, BankSpec, NodeRef, path_refs
from memory_store.tree import Tree, build_tree
from memory_store.writer import BankWriter

__all__ = [
    "AnchorIdentity", "Bank", "BankError", "BankMismatch", "BankSpec", "BankWriter", "BlockCorrupt",
    "BlockInfo", "Embedder", "InvalidSpec", "MiniLMEmbedder", "NodeNotFound", "NodeRef", "Tree",
    "build_tree", "load_embedder", "path_refs",
]
