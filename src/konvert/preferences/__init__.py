"""Preferences members share for points, and consent per purpose (its part in export and
erasure: ``privacy.py``)."""
