"""The design's house rules, checked over the source: one ledger core owns every write to the
ledger's tables and the balance version, and the import boundaries hold (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "konvert"
LEDGER = PACKAGE / "ledger"

LEDGER_TABLES = ("members", "accounts", "system_accounts", "lots", "lot_entries", "transfers", "adjustments")
# A statement that writes one of the ledger's tables, or moves a balance version.
_WRITES = re.compile(
    rf"\b(?:insert\s+into|update|delete\s+from|truncate(?:\s+table)?)\s+({'|'.join(LEDGER_TABLES)})\b"
    r"|\bversion\s*=\s*(?:\w+\.)?version\s*\+",
    re.IGNORECASE,
)


def _strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module (f-strings' literal parts too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def ledger_writes(path: Path) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}"
        for line, text in _strings(path)
        for match in _WRITES.finditer(text)
    ]


def test_only_the_ledger_core_writes_the_ledgers_tables_or_moves_a_version() -> None:
    outside = [path for path in PACKAGE.rglob("*.py") if LEDGER not in path.parents]

    writes = [write for path in outside for write in ledger_writes(path)]

    assert writes == [], "write through konvert.ledger.book instead:\n" + "\n".join(writes)


@pytest.mark.parametrize("table", LEDGER_TABLES)
def test_the_check_finds_the_ledgers_own_writes(table: str) -> None:
    """The check above sees every kind of write it forbids: each table is written in the ledger."""
    writes = [write for path in LEDGER.rglob("*.py") for write in ledger_writes(path)]

    assert any(re.search(rf"\b{table}\b", write) for write in writes)
    assert any("version" in write for write in writes)


def test_the_import_boundaries_hold() -> None:
    """The features import nothing from one another, each layer only the layers below it, the
    foundation no feature (the contracts are in pyproject.toml). In a process of its own:
    import-linter configures logging as it likes."""
    lint = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))"
    )
    result = subprocess.run([sys.executable, "-c", lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
