"""Errors raised to callers for wrong input."""

from __future__ import annotations

from collections.abc import Iterable


class UndeclaredLookup(ValueError):
    """get_cached() was called with fields that are not a declared lookup."""

    def __init__(
        self,
        model_label: str,
        given: Iterable[str],
        declared: Iterable[tuple[str, ...]],
        why_not: str | None = None,
    ):
        self.given = tuple(sorted(given))
        self.declared = tuple(declared)
        names = ", ".join("(" + ", ".join(d) + ")" for d in self.declared)
        # Keywords that no declaration could make a lookup get the reason instead.
        advice = why_not or "Declare it in the manager's lookups"
        super().__init__(
            f"{model_label}: ({', '.join(self.given)}) is not a declared cache lookup; "
            f"declared lookups are {names}. {advice}."
        )


class UncacheableArguments(TypeError):
    """A cached function was called with arguments that have no stable key."""
