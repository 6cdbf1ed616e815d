"""What the portal's tests share: a program with rewards and portal origins, and its app."""

from __future__ import annotations

from tests.conftest import TEST_PROGRAM

# Rewards to redeem, and origins the portal trusts. The embedding tests serve pages from
# loopback origins of their own; these placeholders are replaced with them.
PORTAL_PROGRAM = (
    TEST_PROGRAM
    + """
[[rewards]]
reward_id = "coffee"
name = "Free coffee"
description = "Any coffee at the Berlin store"
cost_points = 150

[[rewards]]
reward_id = "tote-bag"
name = "Canvas tote bag"
cost_points = 800
stock = 1

[tiers]
window_days = 365

[[tiers.levels]]
name = "Bronze"
min_points = 0

[[tiers.levels]]
name = "Silver"
min_points = 1000
multiplier = 1

[portal]
return_origins = ["https://shop.example.com"]
frame_ancestors = [FRAME_ANCESTORS]
"""
)


def portal_program_text(*frame_ancestors: str) -> str:
    return PORTAL_PROGRAM.replace("FRAME_ANCESTORS", ", ".join(f'"{origin}"' for origin in frame_ancestors))
