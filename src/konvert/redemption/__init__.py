"""redemption."""
