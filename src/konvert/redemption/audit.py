"""Audit checks of this feature: (invariant, query returning (what, detail) rows)."""

CHECKS: tuple[tuple[str, str], ...] = ()
