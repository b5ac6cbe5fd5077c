"""A small order service: place orders, reserve stock exactly once, and watch a mail outage fill the dead letters."""
