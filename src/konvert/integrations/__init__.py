"""Webhooks in: Shopify, Stripe and Discourse deliveries applied through the features (README.md)."""
