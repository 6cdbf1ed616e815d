"""Routes of this feature (registered by konvert.app)."""

from typing import Any

ROUTES: list[Any] = []
