"""Errors the memory-bank service raises itself; memory_store's errors pass through unchanged.

The interceptor in `interceptor.py` maps both to gRPC status codes, in one place.
"""

from __future__ import annotations


class BankServiceError(Exception):
    """Base of the service's own errors."""


class InvalidRequest(BankServiceError):
    """The request is malformed (undecodable, empty, level or index out of range, duplicates)."""


class LimitExceeded(BankServiceError):
    """The request asks for more nodes or bytes than one call may carry."""


class NotInShard(BankServiceError):
    """The node exists in the bank but another shard owns it."""


class DeadlineExpired(BankServiceError):
    """The caller's deadline passed while its blocks were being streamed."""
