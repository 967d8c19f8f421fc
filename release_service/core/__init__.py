"""What every role needs: settings, errors, logs, metrics, Redis keys, Kafka topics,
PostgreSQL and time formatting."""
