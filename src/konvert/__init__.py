"""konvert: a self-hosted loyalty points and reputation engine."""

__version__ = "0.1.0"
