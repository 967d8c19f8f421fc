"""From Redis to Kafka and back: the outbox relay and reconcile."""
