"""Kudos (scope kudos:write), member reputation and leaderboards (scope members:read)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, delete, get, post
from litestar.params import JSONBody, QueryParameter

from konvert.idempotency import written
from konvert.ledger.model import MemberId
from konvert.paths import path_parameter
from konvert.reputation import leaderboard, service
from konvert.reputation.model import (
    KudosId,
    KudosIn,
    KudosOut,
    Leaderboard,
    LeaderboardPosition,
    MemberReputation,
    Period,
    RetractionIn,
)
from konvert.services import Svc

MemberPath = Annotated[MemberId, path_parameter(MemberId, "The member's id, as the caller knows it.")]
PeriodQuery = Annotated[Period, QueryParameter(description="all time, or the current ISO week / calendar month (UTC)")]
SourceQuery = Annotated[
    str | None,
    QueryParameter(
        description="only reputation from this source (forum); all sources when absent",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    ),
]


class KudosController(Controller):
    path = "/v1/kudos"
    tags = ["reputation"]
    opt = {"scope": "kudos:write"}

    @post(
        "/",
        opt={
            "body": True,
            "idempotency_key": "kudos_id",
            "problems": (
                "self_kudos",
                "duplicate_kudos",
                "idempotency_conflict",
                "giver_limit_reached",
                "conflict",
            ),
        },
    )
    async def give(self, data: JSONBody[KudosIn], services: Svc) -> Response[KudosOut]:
        """Record a kudos (like, helpful, accepted answer) and credit the reputation it is worth.

        Likes and helpful marks give the author their program value, within a daily cap per
        member that is shared out in the order the kudos happened (so the result never depends
        on arrival order; `changes` lists every kudos whose share moved). An accepted answer
        gives its author and the member who accepted it their values outside the cap, and
        replaces the thread's previous accepted answer. `kudos_id` is the idempotency key:
        the same body again returns the original response (`Idempotent-Replayed: true`),
        another body is 409 `idempotency_conflict`, and a second standing kudos from the same
        giver for the same post and kind is 409 `duplicate_kudos`. Liking one's own post is
        422 `self_kudos`; more kudos than the giver's daily limit is 429 `giver_limit_reached`.
        """
        return written(await service.give_kudos(services, data))

    @delete("/{kudos_id:str}", opt={"idempotency_key": "kudos_id", "problems": ("kudos_not_found",)}, status_code=200)
    async def retract(
        self,
        kudos_id: Annotated[KudosId, path_parameter(KudosId, "The kudos' id, as given when it was posted.")],
        services: Svc,
    ) -> Response[KudosOut]:
        """Retract a kudos: reverse exactly what it credits, as new transfers linked to its award.

        If it was over the daily cap, other kudos of that day may take the room it frees
        (listed in `changes`). Retracting again returns the same result with
        `Idempotent-Replayed: true`.
        """
        return written(await service.retract_kudos(services, kudos_id), status_code=200)

    @post(
        "/retractions",
        opt={"body": True, "idempotency_key": "post_id", "problems": ("kudos_not_found",)},
        status_code=200,
    )
    async def retract_by_key(self, data: JSONBody[RetractionIn], services: Svc) -> Response[KudosOut]:
        """Retract the kudos a giver gave to a post, named by source, post, giver and kind.

        For forums that do not keep konvert's kudos_id. Works like `DELETE /v1/kudos/{kudos_id}`
        on the standing kudos; when none stands, replays the last retraction.
        """
        return written(await service.retract_kudos_by_key(services, data), status_code=200)


class ReputationController(Controller):
    path = "/v1/members/{member_id:str}"
    tags = ["reputation"]
    opt = {"scope": "members:read", "problems": ("member_not_found",)}

    @get("/reputation")
    async def reputation(self, member_id: MemberPath, services: Svc) -> MemberReputation:
        """The member's reputation and rank, what the next rank needs, where the reputation comes
        from (by source and kind), and what likes gave today within the daily cap."""
        return await service.member_reputation(services, member_id)


class LeaderboardController(Controller):
    path = "/v1/leaderboards/reputation"
    tags = ["reputation"]
    opt = {"scope": "members:read", "problems": ("leaderboard_unavailable",)}

    @get("/")
    async def board(
        self,
        services: Svc,
        period: PeriodQuery = "all",
        source: SourceQuery = None,
        limit: Annotated[int, QueryParameter(ge=1, le=100, description="how many members")] = 10,
    ) -> Leaderboard:
        """The members who gained the most reputation in the period, with dense ranks (equal
        reputation, equal rank; the next rank is one more).

        503 `leaderboard_unavailable` while Redis is down. After Redis lost the boards, the
        first read rebuilds them from PostgreSQL.
        """
        return await leaderboard.top(services, period, source, limit)

    @get("/members/{member_id:str}", opt={"problems": ("member_not_found", "leaderboard_unavailable")})
    async def member_position(
        self, member_id: MemberPath, services: Svc, period: PeriodQuery = "all", source: SourceQuery = None
    ) -> LeaderboardPosition:
        """A member's dense rank and the reputation they gained in the period (rank null: none gained)."""
        return await leaderboard.position(services, member_id, period, source)


ROUTES: list[Any] = [KudosController, ReputationController, LeaderboardController]
