"""Micro-benchmark of the pure earning rules: konvert.earning.rules.compute_earning on a 3-line purchase.

    python -m pytest loadtests/bench_earning.py --benchmark-only      # pytest-benchmark (konvert[bench])
    python loadtests/bench_earning.py                                  # no pytest needed

The floor to beat is 10,000 purchases per second on one core: at that rate the rules cost at most
0.1 ms of a purchase, so they are never what limits postings. The default ``python -m pytest``
at the repository root does not collect this file (pyproject's testpaths is ["tests"]), so the
timing assertion below only runs when someone runs the benchmark on purpose.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from konvert.earning.model import PurchaseIn
from konvert.earning.rules import compute_earning
from konvert.program import load_program

PURCHASES_PER_SECOND_MIN = 10_000

# What loadtests/wrk/purchases.lua posts: three lines, one of them a book (double points in the
# example program), prices in cents.
PURCHASE_JSON = b"""{
  "purchase_id": "bench-1", "member_id": "m1", "partner": "webshop", "currency": "EUR",
  "occurred_at": "2026-11-20T12:00:00Z",
  "lines": [
    {"line_id": "1", "sku": "BOOK-17", "category": "books", "quantity": 2, "unit_price": 1999},
    {"line_id": "2", "sku": "ELEC-4", "category": "electronics", "quantity": 1, "unit_price": 5450},
    {"line_id": "3", "sku": "FOOD-9", "category": "grocery", "quantity": 3, "unit_price": 725}
  ]
}"""


def _purchase() -> PurchaseIn:
    return msgspec.json.decode(PURCHASE_JSON, type=PurchaseIn)


def _check(result: Any) -> None:
    # 2 x 19.99 x 2 (books) + 54.50 + 3 x 7.25, each line floored.
    assert result.points == 79 + 54 + 21, result


def test_compute_earning(benchmark: Any) -> None:
    """compute_earning for one purchase with the example program, as posting does it (with a tier)."""
    program = load_program()
    purchase = _purchase()
    result = benchmark(compute_earning, program, purchase, tier_multiplier=Decimal(1), tier_name=None)
    _check(result)
    per_second = 1 / benchmark.stats.stats.mean
    benchmark.extra_info["purchases_per_second"] = round(per_second)
    print(f"\ncompute_earning: {per_second:,.0f} purchases/s on one core (floor {PURCHASES_PER_SECOND_MIN:,})")
    assert per_second >= PURCHASES_PER_SECOND_MIN, f"{per_second:,.0f} purchases/s is below the floor"


def test_decode_and_compute_earning(benchmark: Any) -> None:
    """The same, plus decoding the request body into PurchaseIn (what the HTTP edge adds)."""
    program = load_program()
    decode = msgspec.json.Decoder(PurchaseIn).decode

    def work() -> Any:
        return compute_earning(program, decode(PURCHASE_JSON))

    _check(benchmark(work))
    per_second = 1 / benchmark.stats.stats.mean
    benchmark.extra_info["purchases_per_second"] = round(per_second)
    print(f"\ndecode + compute_earning: {per_second:,.0f} purchases/s on one core")


def main() -> int:
    """Without pytest: time compute_earning for about two seconds and print purchases/s."""
    program = load_program()
    purchase = _purchase()
    _check(compute_earning(program, purchase))
    rounds, best = 5, 0.0
    for _ in range(rounds):
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < 0.4:
            for _ in range(100):
                compute_earning(program, purchase)
            count += 100
        best = max(best, count / elapsed)
    print(
        f"compute_earning, 3-line purchase, example program: {best:,.0f} purchases/s on one core "
        f"(best of {rounds}; floor {PURCHASES_PER_SECOND_MIN:,}) at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    return 0 if best >= PURCHASES_PER_SECOND_MIN else 1


if __name__ == "__main__":
    sys.exit(main())
