"""CLI handlers for training commands (run, apply, search, pareto)."""

from __future__ import annotations


def add_commands(sub) -> None:
    return None
