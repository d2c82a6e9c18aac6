"""Reproductions of published experiments, built on the public API (used by ``koopkit demo``)."""
