"""The named errors of memory_store; transports map them to status codes in one place."""

from __future__ import annotations


class BankError(Exception):
    """Base class: a bank cannot be opened, read or written as asked."""


class InvalidSpec(BankError, ValueError):
    """A BankSpec (or an array given for it) is inconsistent; the message says which field and why."""


class NodeNotFound(BankError, KeyError):
    """The node does not exist in the bank, was deleted, or is not held by the shard asked."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "node not found"


class BlockCorrupt(BankError):
    """A block's bytes do not match the crc32c recorded in the manifest: never serve or inject it."""


class BankMismatch(BankError):
    """A bank does not fit its user: another bank_id, another anchor, another embedder."""
