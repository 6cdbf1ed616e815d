"""The program file: a loyalty program's rules, in TOML, decoded into frozen msgspec Structs.

Decimal values (rates, multipliers) are parsed as :class:`decimal.Decimal`, never float, so that
"1.1 points per euro" is exactly 1.1. Unknown keys are refused so a typo cannot silently turn a
rule off. :func:`load_program` names the bad key and why.
"""

from __future__ import annotations

import tomllib
from datetime import datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from konvert.errors import ConfigurationError

Identifier = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$(?!\n)")]
CurrencyCode = Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
# msgspec cannot bound Decimals, so the rules below check their own with _non_negative().
NonNegativeDecimal = Decimal
Days = Annotated[int, Meta(ge=0, le=36_500)]
PointsCap = Annotated[int, Meta(ge=1, le=1_000_000_000)]

# ISO 4217 exponents that differ from the usual 2. A currency listed in the program may
# override it with `minor_units`.
_ISO_4217_EXPONENTS = {
    "BHD": 3,
    "BIF": 0,
    "CLF": 4,
    "CLP": 0,
    "DJF": 0,
    "GNF": 0,
    "IQD": 3,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KMF": 0,
    "KRW": 0,
    "KWD": 3,
    "LYD": 3,
    "OMR": 3,
    "PYG": 0,
    "RWF": 0,
    "TND": 3,
    "UGX": 0,
    "UYI": 0,
    "UYW": 4,
    "VND": 0,
    "VUV": 0,
    "XAF": 0,
    "XOF": 0,
    "XPF": 0,
}


def currency_exponent(currency: str) -> int:
    return _ISO_4217_EXPONENTS.get(currency, 2)


class _Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


def _non_negative(where: str, **values: Decimal) -> None:
    for name, value in values.items():
        if not value.is_finite() or value < 0:
            raise ValueError(f"{where}: {name} must be a number >= 0, got {value}")


class Partner(_Rule, frozen=True):
    """A store or merchant that posts purchases. Several partners make a coalition."""

    id: Identifier
    name: str = ""


class EarningRate(_Rule, frozen=True):
    """Points per major currency unit (1 EUR, 1 JPY) spent in ``currency``, optionally for one partner."""

    currency: CurrencyCode
    points_per_unit: NonNegativeDecimal
    partner: Identifier | None = None
    minor_units: Annotated[int, Meta(ge=0, le=4)] | None = None

    def __post_init__(self) -> None:
        _non_negative(f"rate {self.currency}", points_per_unit=self.points_per_unit)


class CategoryRule(_Rule, frozen=True):
    """Multiplies (or, with ``exclude``, removes) the points of lines in a category."""

    category: Annotated[str, Meta(min_length=1, max_length=128)]
    multiplier: NonNegativeDecimal = Decimal(1)
    exclude: bool = False

    def __post_init__(self) -> None:
        _non_negative(f"category {self.category}", multiplier=self.multiplier)


class SkuRule(_Rule, frozen=True):
    sku: Annotated[str, Meta(min_length=1, max_length=128)]
    multiplier: NonNegativeDecimal = Decimal(1)
    exclude: bool = False

    def __post_init__(self) -> None:
        _non_negative(f"sku {self.sku}", multiplier=self.multiplier)


class Campaign(_Rule, frozen=True):
    """A time-boxed boost: a multiplier on matching lines, or a fixed bonus per purchase, or both.

    ``partners`` and ``categories`` filter what the campaign applies to; empty means all.
    The window is half-open: ``starts_at <= occurred_at < ends_at``.
    """

    id: Identifier
    starts_at: datetime
    ends_at: datetime
    multiplier: NonNegativeDecimal = Decimal(1)
    bonus_points: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    partners: tuple[Identifier, ...] = ()
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _non_negative(f"campaign {self.id}", multiplier=self.multiplier)
        if self.ends_at <= self.starts_at:
            raise ValueError(f"campaign {self.id}: ends_at must be after starts_at")
        if self.starts_at.tzinfo is None or self.ends_at.tzinfo is None:
            raise ValueError(f"campaign {self.id}: starts_at and ends_at need a UTC offset")


class Earning(_Rule, frozen=True):
    # How a line's fractional points become whole points.
    rounding: Literal["floor", "half_up", "ceil"] = "floor"
    # Largest number of points one purchase can earn (bonuses included). None: no cap.
    purchase_cap_points: PointsCap | None = None
    earn_on_shipping: bool = False
    earn_on_tax: bool = False
    rates: tuple[EarningRate, ...] = ()
    categories: tuple[CategoryRule, ...] = ()
    skus: tuple[SkuRule, ...] = ()
    campaigns: tuple[Campaign, ...] = ()


class Points(_Rule, frozen=True):
    # Days a purchase's points stay pending (the return window). 0: available at once.
    return_window_days: Days = 0
    # Rolling expiry per lot: expire_after_days after it was earned (None: never), optionally
    # moved to the end of that month so that members see fewer, rounder dates.
    expiry_rounding: Literal["none", "end_of_month"] = "none"
    # How long a redemption's hold reserves points before it is released automatically.
    hold_ttl_seconds: Annotated[int, Meta(ge=1, le=30 * 86400)] = 900
    # Whether a refund of already-spent points may take the balance below zero. If not, the
    # clawback stops at zero and the shortfall is recorded on the refund.
    allow_negative_balance: bool = True
    # Days after earning that a lot expires; None: points never expire.
    expire_after_days: Days | None = None
    # How many soonest-expiring lots a balance shows.
    expiring_lots_shown: Annotated[int, Meta(ge=0, le=100)] = 3


class Reward(_Rule, frozen=True):
    """Something points can be converted into. The program file seeds the catalog; operators
    manage it through the admin API afterwards."""

    reward_id: Identifier
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    cost_points: Annotated[int, Meta(ge=1, le=1_000_000_000)]
    description: Annotated[str, Meta(max_length=2000)] = ""
    stock: Annotated[int, Meta(ge=0, le=1_000_000_000)] | None = None
    available_from: datetime | None = None
    available_until: datetime | None = None
    active: bool = True


class TierLevel(_Rule, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    # Points earned (net of refunds) in the trailing window needed to hold this tier.
    min_points: Annotated[int, Meta(ge=0, le=1_000_000_000)]
    # Applied to what purchases earn while the member holds the tier.
    multiplier: NonNegativeDecimal = Decimal(1)

    def __post_init__(self) -> None:
        _non_negative(f"tier {self.name}", multiplier=self.multiplier)


class Tiers(_Rule, frozen=True):
    window_days: Annotated[int, Meta(ge=1, le=3650)] = 365
    # A member who falls below their tier keeps it this many days before moving down.
    downgrade_grace_days: Days = 0
    levels: tuple[TierLevel, ...] = ()

    def __post_init__(self) -> None:
        thresholds = [level.min_points for level in self.levels]
        if self.levels and thresholds[0] != 0:
            raise ValueError("tiers.levels: the first tier must start at min_points = 0")
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tiers.levels: min_points must increase from tier to tier")

    def next_after(self, current: str | None) -> TierLevel | None:
        """The tier above ``current`` (the lowest one for a member without a tier); None at the top."""
        names = [level.name for level in self.levels]
        if current not in names:
            return self.levels[0] if self.levels else None
        index = names.index(current)
        return self.levels[index + 1] if index + 1 < len(self.levels) else None


class Adjustments(_Rule, frozen=True):
    reason_codes: tuple[Identifier, ...] = ("goodwill", "correction", "migration")


class KudosValues(_Rule, frozen=True):
    """Reputation per kind of kudos (Stack Exchange / Discourse defaults)."""

    like: Annotated[int, Meta(ge=0, le=10_000)] = 10
    helpful: Annotated[int, Meta(ge=0, le=10_000)] = 10
    accepted_answer: Annotated[int, Meta(ge=0, le=10_000)] = 15
    # To the member who accepted someone else's answer.
    accepter: Annotated[int, Meta(ge=0, le=10_000)] = 2


class Rank(_Rule, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    min_reputation: Annotated[int, Meta(ge=0, le=1_000_000_000)]


class Reputation(_Rule, frozen=True):
    kudos: KudosValues = KudosValues()
    # Most reputation a member gains per UTC day from likes and helpful marks (accepted answers
    # are exempt).
    daily_cap: Annotated[int, Meta(ge=0, le=1_000_000)] = 200
    # Most kudos one member may give per UTC day.
    giver_daily_limit: Annotated[int, Meta(ge=1, le=100_000)] = 50
    # A giver's kudos only count once the giver has this much reputation / this account age.
    giver_min_reputation: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    giver_min_account_age_days: Days = 0
    # Reputation never goes below this.
    floor: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    # Loyalty points awarded for an accepted answer (0: off). Reputation itself never converts.
    accepted_answer_points: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    ranks: tuple[Rank, ...] = (
        Rank(name="Newcomer", min_reputation=0),
        Rank(name="Contributor", min_reputation=50),
        Rank(name="Helper", min_reputation=200),
        Rank(name="Expert", min_reputation=1000),
        Rank(name="Guru", min_reputation=5000),
    )

    def __post_init__(self) -> None:
        thresholds = [rank.min_reputation for rank in self.ranks]
        if not self.ranks or thresholds[0] != 0:
            raise ValueError("reputation.ranks: the first rank must start at min_reputation = 0")
        if thresholds != sorted(set(thresholds)):
            raise ValueError("reputation.ranks: min_reputation must increase from rank to rank")


PreferenceType = Literal["choice", "multi_choice", "text", "month_day", "boolean"]
PreferenceChoice = Annotated[str, Meta(min_length=1, max_length=200)]


class PreferenceDef(_Rule, frozen=True):
    """A preference members may share: what it holds, what sharing it first earns, and the
    purposes it may ever be used for (a member consents to some or all of them)."""

    key: Identifier
    label: Annotated[str, Meta(min_length=1, max_length=200)]
    type: PreferenceType
    # The purposes this preference may be used for; a member consents to some or all of them.
    purposes: Annotated[tuple[Identifier, ...], Meta(min_length=1)]
    # The allowed values of a choice or multi_choice preference, in the order apps show them.
    choices: Annotated[tuple[PreferenceChoice, ...], Meta(max_length=500)] = ()
    # The longest text value, in characters (text preferences only).
    max_length: Annotated[int, Meta(ge=1, le=10_000)] = 200
    # Points for the first time a member shares this preference (never again for the same key).
    points: Annotated[int, Meta(ge=0, le=1_000_000)] = 0

    def __post_init__(self) -> None:
        if self.type in ("choice", "multi_choice"):
            if not self.choices:
                raise ValueError(f"preferences.catalog {self.key}: a {self.type} preference needs choices")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"preferences.catalog {self.key}: choices must be unique")
        elif self.choices:
            raise ValueError(f"preferences.catalog {self.key}: only choice and multi_choice take choices")
        if len(set(self.purposes)) != len(self.purposes):
            raise ValueError(f"preferences.catalog {self.key}: purposes must be unique")


class Preferences(_Rule, frozen=True):
    """What members may share for points, and the purposes shared data may be used for."""

    purposes: Annotated[tuple[Identifier, ...], Meta(min_length=1, max_length=50)] = (
        "personalisation",
        "marketing",
        "support",
    )
    # Whether deleting a preference takes back the points its first sharing earned.
    claw_back_on_withdrawal: bool = False
    catalog: Annotated[tuple[PreferenceDef, ...], Meta(max_length=500)] = ()

    def __post_init__(self) -> None:
        if len(set(self.purposes)) != len(self.purposes):
            raise ValueError("preferences.purposes: purposes must be unique")
        keys = [d.key for d in self.catalog]
        if len(set(keys)) != len(keys):
            raise ValueError("preferences.catalog: keys must be unique")
        for definition in self.catalog:
            unknown = [p for p in definition.purposes if p not in self.purposes]
            if unknown:
                raise ValueError(
                    f"preferences.catalog {definition.key}: unknown purpose {', '.join(unknown)}; "
                    f"preferences.purposes are {', '.join(self.purposes)}"
                )

    def find(self, key: str) -> PreferenceDef | None:
        return next((d for d in self.catalog if d.key == key), None)


# A web origin as browsers compare them: scheme, host and an optional port, nothing after.
Origin = Annotated[str, Meta(max_length=253, pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")]


class Portal(_Rule, frozen=True):
    """The member portal: where it may send members back to, and who may embed its card."""

    # Origins a portal link's return_url may point at (the shop's or forum's own pages).
    return_origins: Annotated[tuple[Origin, ...], Meta(max_length=50)] = ()
    # Origins whose pages may show the card (/portal/card) in a frame; every other page is
    # refused (Content-Security-Policy frame-ancestors). Empty: no one may embed it.
    frame_ancestors: Annotated[tuple[Origin, ...], Meta(max_length=50)] = ()


class Program(_Rule, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    partners: tuple[Partner, ...] = ()
    points: Points = Points()
    earning: Earning = Earning()
    rewards: tuple[Reward, ...] = ()
    tiers: Tiers = Tiers()
    adjustments: Adjustments = Adjustments()
    reputation: Reputation = Reputation()
    preferences: Preferences = Preferences()
    portal: Portal = Portal()

    def __post_init__(self) -> None:
        partner_ids = [p.id for p in self.partners]
        if not partner_ids:
            raise ValueError("partners: a program needs at least one partner")
        if len(set(partner_ids)) != len(partner_ids):
            raise ValueError("partners: partner ids must be unique")
        for rate in self.earning.rates:
            if rate.partner is not None and rate.partner not in partner_ids:
                raise ValueError(f"earning.rates: unknown partner {rate.partner!r}")
        seen = {(r.currency, r.partner) for r in self.earning.rates}
        if len(seen) != len(self.earning.rates):
            raise ValueError("earning.rates: one rate per currency and partner")
        reward_ids = [r.reward_id for r in self.rewards]
        if len(set(reward_ids)) != len(reward_ids):
            raise ValueError("rewards: reward ids must be unique")
        for campaign in self.earning.campaigns:
            for partner in campaign.partners:
                if partner not in partner_ids:
                    raise ValueError(f"earning.campaigns: campaign {campaign.id} names unknown partner {partner!r}")

    def has_partner(self, partner: str) -> bool:
        return any(p.id == partner for p in self.partners)


def example_program_text() -> str:
    return resources.files("konvert").joinpath("example_program.toml").read_text("utf-8")


def parse_program(text: str, source: str = "program file") -> Program:
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(data, Program, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"{source}: {_readable(str(exc))}") from None


def load_program(path: str = "") -> Program:
    """Load the program file at ``path``, or the shipped example program when it is empty."""
    if not path:
        return parse_program(example_program_text(), "example program")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigurationError(f"program file {path}: cannot be read: {exc.strerror}") from None
    return parse_program(text, f"program file {path}")


def _readable(message: str) -> str:
    # "Expected `int`, got `str` - at `$.points.return_window_days`" -> key first, then why.
    if " - at `$" in message:
        text, _, path = message.partition(" - at `$")
        key = path.rstrip("`").lstrip(".") or "(top level)"
        return f"key {key}: {text}"
    return message
