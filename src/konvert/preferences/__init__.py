"""Preferences members share for points, consent per purpose, export and erasure."""
