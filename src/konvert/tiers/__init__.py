"""Tiers: a member's level, qualified on points earned (net of refunds) in a trailing window,
never on the balance. Rules in rules.py, the qualifying sums in store.py, the daily job and the
re-evaluation after a refund in service.py; the standing itself is stored on the member by the
ledger core, which shows it with the balance."""
