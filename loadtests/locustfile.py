"""The harness's personas for Locust (pip install 'konvert[bench]'), against a running konvert.

    KONVERT_BENCH_API_KEY=kvt_... KONVERT_BENCH_MEMBERS=100000 \\
        locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

    # one persona only, headless, bounded in time:
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 32 -t 30s Checkout

Personas (the same as loadtests/wrk/*.lua):

* ``Checkout``: a till or web shop posting purchases of three lines, each with a unique id;
* ``MemberApp``: balance reads, 90% of them on the hottest 1% of members;
* ``CheckoutDay``: the mixed day, 70% balance reads, 20% purchases, 5% redemptions, 5% kudos
  (POST /v1/kudos; a 404 there counts as success until the route exists, under its own name).

Members are ``m1`` .. ``m<KONVERT_BENCH_MEMBERS>``, as ``loadtests/run.py --keep`` seeds them;
the key needs the scopes purchases:write, redemptions:write, kudos:write and members:read (or
admin). Locust is a Python load generator: on a small machine it takes more CPU than the service
it measures, so the reference figures come from loadtests/run.py and wrk, not from here.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from datetime import UTC, datetime, timedelta

from locust import FastHttpUser, between, task

API_KEY = os.environ.get("KONVERT_BENCH_API_KEY", "")
MEMBERS = int(os.environ.get("KONVERT_BENCH_MEMBERS", "100000"))
PARTNER = os.environ.get("KONVERT_BENCH_PARTNER", "webshop")
CURRENCY = os.environ.get("KONVERT_BENCH_CURRENCY", "EUR")
HOT_MEMBERS = max(1, MEMBERS // 100)
HOT_SHARE = 0.9
# Redemptions of 1 point: every seeded member has more than enough available points.
REDEEM_POINTS = 1
RUN = uuid.uuid4().hex[:8]
_numbers = itertools.count(1)


def _member(hot: bool = False) -> str:
    if hot and random.random() < HOT_SHARE:
        return f"m{random.randint(1, HOT_MEMBERS)}"
    return f"m{random.randint(1, MEMBERS)}"


def _next_id(kind: str) -> str:
    return f"locust-{RUN}-{kind}-{next(_numbers)}"


def _occurred_at() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(line_id: str, sku: str, category: str) -> dict[str, object]:
    return {
        "line_id": line_id,
        "sku": f"{sku}-{random.randint(1, 5000)}",
        "category": category,
        "quantity": random.randint(1, 3),
        "unit_price": random.randint(500, 6000),
    }


class _Konvert(FastHttpUser):
    abstract = True
    wait_time = between(0, 0)  # closed loop, like wrk: the next request as soon as one is answered

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def post_purchase(self) -> None:
        body = {
            "purchase_id": _next_id("p"),
            "member_id": _member(),
            "partner": PARTNER,
            "currency": CURRENCY,
            "occurred_at": _occurred_at(),
            "lines": [_line("1", "BOOK", "books"), _line("2", "ELEC", "electronics"), _line("3", "FOOD", "grocery")],
        }
        self.client.post("/v1/purchases", json=body, headers=self.headers, name="POST /v1/purchases")

    def read_balance(self, hot: bool) -> None:
        self.client.get(
            f"/v1/members/{_member(hot)}/balance", headers=self.headers, name="GET /v1/members/{id}/balance"
        )

    def redeem(self) -> None:
        body = {"redemption_id": _next_id("r"), "points": REDEEM_POINTS}
        self.client.post(
            f"/v1/members/{_member()}/redemptions",
            json=body,
            headers=self.headers,
            name="POST /v1/members/{id}/redemptions",
        )

    def give_kudos(self) -> None:
        author, giver = _member(), _member()
        kudos_id = _next_id("k")
        body = {
            "kudos_id": kudos_id,
            "source": "forum",
            "post_id": f"post-{kudos_id}",
            "thread_id": f"thread-{kudos_id}",
            "author_id": author,
            "giver_id": giver if giver != author else f"m{int(author[1:]) % MEMBERS + 1}",
            "kind": random.choice(("like",) * 8 + ("helpful",) * 3 + ("accepted_answer",)),
            "occurred_at": _occurred_at(),
        }
        with self.client.post(
            "/v1/kudos", json=body, headers=self.headers, catch_response=True, name="POST /v1/kudos"
        ) as response:
            if response.status_code == 404:
                # The kudos route is still being written; count it apart instead of as a failure.
                response.request_meta["name"] = "POST /v1/kudos (404: no route yet)"
                response.success()


class Checkout(_Konvert):
    """A till or web shop: purchase postings."""

    @task
    def purchase(self) -> None:
        self.post_purchase()


class MemberApp(_Konvert):
    """The member app: balance reads, hot-member skew."""

    @task
    def balance(self) -> None:
        self.read_balance(hot=True)


class CheckoutDay(_Konvert):
    """The mixed day: 70% balance reads, 20% purchases, 5% redemptions, 5% kudos."""

    @task(70)
    def balance(self) -> None:
        self.read_balance(hot=False)

    @task(20)
    def purchase(self) -> None:
        self.post_purchase()

    @task(5)
    def redemption(self) -> None:
        self.redeem()

    @task(5)
    def kudos(self) -> None:
        self.give_kudos()
