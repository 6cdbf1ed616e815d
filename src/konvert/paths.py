"""Path parameters validated like bodies.

Litestar enforces a path parameter's ``pattern``, ``min_length`` and ``max_length`` only when its
``PathParameter`` states them; a msgspec ``Annotated[str, Meta(...)]`` alias alone only documents
them in the OpenAPI. :func:`path_parameter` derives the PathParameter from the alias's Meta, so
the bounds are written once (on the alias, which bodies use too) and a bad id answers 422.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec
from litestar.params import KwargDefinition, PathParameter


def path_parameter(alias: Any, description: str) -> KwargDefinition:
    """The PathParameter for a value of type ``alias`` (an ``Annotated[str, Meta(...)]``)."""
    bounds: dict[str, Any] = {}
    for meta in get_args(alias)[1:]:
        if isinstance(meta, msgspec.Meta):
            for name in ("pattern", "min_length", "max_length"):
                if getattr(meta, name) is not None:
                    bounds[name] = getattr(meta, name)
    if not bounds:
        raise TypeError(f"{alias!r} states no bounds for a path parameter")
    parameter: KwargDefinition = PathParameter(description=description, **bounds)
    return parameter
