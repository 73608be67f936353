"""Bounded retries, with jitter, of work that lost a race (serialization failure, deadlock).

Only :class:`~slack_fathom_db.errors.SerializationConflict` is retried: any
other error is final, and so is the last attempt's conflict.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Final, TypeVar

from slack_fathom_db.errors import SerializationConflict

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ATTEMPTS", "retry_conflicts"]

T = TypeVar("T")

ATTEMPTS: Final = 4
BASE_DELAY: Final = 0.005  # seconds; attempt n sleeps up to BASE_DELAY * 2**n ("full jitter")


async def retry_conflicts(operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation``; run it again after a serialization conflict, at most ATTEMPTS times."""
    for attempt in range(1, ATTEMPTS):
        try:
            return await operation()
        except SerializationConflict:
            await asyncio.sleep(random.uniform(0, BASE_DELAY * 2**attempt))  # noqa: S311 - jitter
    return await operation()
