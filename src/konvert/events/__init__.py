"""Events out: the outbox (konvert.ledger.events) published to a Redis Stream, to signed webhook
endpoints, and as a pull feed."""
