"""Argument types shared by the ``syncstore`` commands (argparse ``type=`` callables with clear messages)."""

from __future__ import annotations

import argparse

__all__ = ["int_at_least", "seconds"]


def int_at_least(low: int, high: int | None = None) -> type[int]:
    """An argparse type: an int in ``low..high`` (``high`` None: no upper bound), else a message saying which."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse  # type: ignore[return-value]


def seconds(text: str) -> float:
    """An argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
