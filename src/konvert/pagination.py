"""Opaque cursors for newest-first lists: the id of the last item seen, tagged by list kind."""

from __future__ import annotations

import base64

from konvert import errors


def encode_cursor(kind: str, last_id: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}{last_id}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    """The id a cursor of this kind points past; 422 naming ``cursor`` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(kind):
            raise ValueError(text)
        last_id = int(text[len(kind) :])
        if not 0 < last_id < 2**63:  # ids are positive bigints
            raise ValueError(text)
        return last_id
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise errors.ValidationFailed(
            "cursor is not one this API gave out", errors=[{"field": "cursor", "message": "invalid cursor"}]
        ) from None
