"""Every problem an API test meets is one the OpenAPI document lists for its route and status.

The tests' HTTP client (tests/conftest.py, ``serve``) runs :class:`ProblemCodes` on each answer,
so the whole suite checks the document's per-route codes against what the service really sends;
a code a route gained without its ``opt["problems"]`` fails the test that provoked it.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from litestar import Litestar

from konvert.contract import documented_codes
from konvert.problems import PROBLEM_MEDIA_TYPE


class ProblemCodes:
    def __init__(self, app: Litestar) -> None:
        self._app = app
        self._operations: list[tuple[str, re.Pattern[str], int, dict[int, set[str]]]] | None = None

    def operations(self) -> list[tuple[str, re.Pattern[str], int, dict[int, set[str]]]]:
        """(method, path pattern, literal segments, codes by status) of each operation."""
        if self._operations is None:
            document: dict[str, Any] = self._app.openapi_schema.to_schema()
            self._operations = [
                (
                    method.upper(),
                    re.compile(
                        "^"
                        + "/".join("[^/]+" if part.startswith("{") else re.escape(part) for part in path.split("/"))
                        + "$"
                    ),
                    sum(1 for part in path.split("/") if part and not part.startswith("{")),
                    documented_codes(operation),
                )
                for path, item in document["paths"].items()
                for method, operation in item.items()
            ]
        return self._operations

    async def __call__(self, response: httpx.Response) -> None:
        if not response.headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE):
            return
        if response.status_code == 500:
            return  # a bug is in no document; the tests that inject one check its answer themselves
        request = response.request
        matches = [
            (literal, codes)
            for method, pattern, literal, codes in self.operations()
            if method == request.method and pattern.match(request.url.path)
        ]
        if not matches:
            return  # no operation: an unknown path (404), a method the path lacks (405), a portal page
        codes = max(matches, key=lambda match: match[0])[1]
        await response.aread()
        code = response.json().get("code")
        listed = codes.get(response.status_code, set())
        assert code in listed, (
            f"{request.method} {request.url.path} answered {response.status_code} {code!r}, "
            f"which its operation does not list (it lists {sorted(listed)}): add it to the route's opt['problems']"
        )
