"""Backoff: how long to wait before the next try, doubling up to a ceiling.

One policy type for both jobs that retry: reconnecting (paho runs the loop; the
SDKs hand it `initial` and `maximum`) and requests answered `rate_limited` or
`unavailable` (the device SDK retries them; see requests.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    maximum: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ValueError(f"bad backoff {self}: need 0 < initial <= maximum and factor >= 1")

    def delays(self) -> Iterator[float]:
        """initial, initial*factor, ... capped at maximum, for ever."""
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.maximum)


# paho's own reconnect loop doubles from min_delay to max_delay (whole seconds).
DEVICE_RECONNECT = Backoff(1, 30)
CLIENT_RECONNECT = Backoff(1, 15)
# Requests refused with a retryable code (device SDK).
REQUEST_RETRY = Backoff(0.2, 5.0)
