"""The member export: everything konvert holds on one member, as one JSON document."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from konvert.ledger.model import ActivityItem
from konvert.preferences.model import ConsentState, ExportAward, PreferenceItem, PrivacyLogEntry


class ExportBalances(msgspec.Struct, frozen=True, kw_only=True):
    available: int
    pending: int
    held: int
    debt: int
    lifetime_earned: int
    reputation: int


class ExportMember(msgspec.Struct, frozen=True, kw_only=True):
    member_id: str
    created_at: datetime
    tier: str | None
    balances: ExportBalances


class ExportLot(msgspec.Struct, frozen=True, kw_only=True):
    lot_id: int
    amount: int
    remaining: int
    state: str
    vests_at: datetime
    expires_at: datetime | None
    created_at: datetime


class ExportRefund(msgspec.Struct, frozen=True, kw_only=True):
    refund_id: str
    amount: int
    points: int
    shortfall: int
    created_at: datetime


class ExportPurchase(msgspec.Struct, frozen=True, kw_only=True):
    partner: str
    purchase_id: str
    currency: str
    occurred_at: datetime
    total_amount: int
    points: int
    created_at: datetime
    refunds: list[ExportRefund]


class ExportRedemption(msgspec.Struct, frozen=True, kw_only=True):
    redemption_id: str
    reward_id: str | None
    points: int
    status: str
    note: str | None
    created_at: datetime
    updated_at: datetime


class ExportAdjustment(msgspec.Struct, frozen=True, kw_only=True):
    adjustment_id: str
    points: int
    reason_code: str
    note: str
    made_by: str
    created_at: datetime


class Export(msgspec.Struct, frozen=True, kw_only=True):
    """Everything konvert holds on one member (right of access and portability)."""

    format: str
    exported_at: datetime
    member: ExportMember
    preferences: list[PreferenceItem]
    preference_awards: list[ExportAward]
    consents: dict[str, ConsentState]
    # Every preference and consent change, export and erasure, oldest first.
    privacy_log: list[PrivacyLogEntry]
    transfers: list[ActivityItem]
    lots: list[ExportLot]
    purchases: list[ExportPurchase]
    redemptions: list[ExportRedemption]
    adjustments: list[ExportAdjustment]
    # Kudos the member received (as author) and gave, when reputation is installed.
    kudos_received: list[dict[str, Any]]
    kudos_given: list[dict[str, Any]]
    # Other member-scoped records of optional features (reputation entries).
    other: dict[str, list[dict[str, Any]]]
    # Sections cut at the export's bound (EXPORT_ROWS_MAX rows each); empty when complete.
    truncated: list[str]
