"""schemathesis hooks for tests/e2e/test_contract.py (loaded through SCHEMATHESIS_HOOKS).

One check beyond schemathesis' own: a problem+json answer's ``code`` is one the operation
documents for that status, so a client switching on codes meets no code it was not told of.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from konvert.contract import documented_codes
from konvert.problems import PROBLEM_MEDIA_TYPE


@schemathesis.check
def problem_code_is_documented(ctx: Any, response: Any, case: Any) -> None:
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith(PROBLEM_MEDIA_TYPE):
        return
    if case.method.upper() != case.operation.method.upper():
        return  # schemathesis tried a method the path lacks: 405, whose Allow it checks itself
    code = response.json().get("code")
    documented = documented_codes(case.operation.definition.raw).get(response.status_code, set())
    if code not in documented:
        raise AssertionError(
            f"{case.method} {case.path} answered {response.status_code} {code!r}; "
            f"the document lists {sorted(documented)} for {response.status_code}"
        )
