"""Community reputation: kudos, retractions, the daily cap, ranks and leaderboards (see README.md)."""
