"""Two processes through NATS JetStream: ``python -m examples.nats``."""
