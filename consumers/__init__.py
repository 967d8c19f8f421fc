"""Kafka consumers: pure message processing per consumer, one shared runner."""
