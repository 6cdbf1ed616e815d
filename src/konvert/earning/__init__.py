"""Earning and refund arithmetic: pure functions over frozen Structs, no I/O."""
