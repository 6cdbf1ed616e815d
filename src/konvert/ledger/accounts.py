"""System accounts: the program's side of every transfer (points issued per partner, redeemed,
expired, adjustments, reputation per kudos source). They have no member and are never updated:
their balance is a sum over transfers, so no request writes a row shared by all members."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import asyncpg

from konvert.db import Connection
from konvert.ledger import store

if TYPE_CHECKING:
    from konvert.services import Services


class SystemAccount(NamedTuple):
    asset: str
    name: str


REDEEMED = SystemAccount("points", "redeemed")
EXPIRED = SystemAccount("points", "expired")
ADJUSTMENTS = SystemAccount("points", "adjustments")


def issued(partner: str) -> SystemAccount:
    """Where a partner's points come from."""
    return SystemAccount("points", f"issued:{partner}")


class SystemAccounts:
    """Ids of system accounts, created on first use and remembered by this process.

    An account is created on a connection of its own that commits at once, never inside the
    caller's transaction: if that transaction rolled back, a remembered id would point at a row
    that does not exist.
    """

    def __init__(self, services: Services) -> None:
        self._database_url = services.settings.database_url
        self._timeout_seconds = services.settings.db_connect_timeout_seconds
        self._ids: dict[SystemAccount, int] = {}

    async def id(self, conn: Connection, account: SystemAccount) -> int:
        account_id = self._ids.get(account)
        if account_id is None:
            account_id = await store.select_system_account(conn, *account)
            if account_id is None:
                account_id = await self._create(account)
            self._ids[account] = account_id
        return account_id

    async def _create(self, account: SystemAccount) -> int:
        own = await asyncpg.connect(self._database_url, timeout=self._timeout_seconds)
        try:
            account_id = await store.insert_system_account(own, *account)
            if account_id is None:  # created meanwhile by another process: committed, so visible
                account_id = await store.select_system_account(own, *account)
            assert account_id is not None
            return account_id
        finally:
            await own.close()

    async def create(self, pool: asyncpg.Pool, accounts: list[SystemAccount]) -> None:
        """Create the accounts a program uses ahead of its first requests."""
        async with pool.acquire() as conn:
            for account in accounts:
                await self.id(conn, account)
