"""Runnable examples (a package so that ``python -m examples.orders`` and ``--app examples.orders.app:bus`` work)."""
