"""Kafka topic names: one place for every topic the service produces or consumes."""

CLAIMS = "slot.claims"
CANCELLATIONS = "slot.cancellations"
CLAIMS_DEAD_LETTER = "slot.claims.dlq"
SMS_DEAD_LETTER = "sms.dlq"
LOTTERY = "lottery.results"  # one event per entry the draw did not pick: its SMS

ALL = (CLAIMS, CANCELLATIONS, CLAIMS_DEAD_LETTER, SMS_DEAD_LETTER, LOTTERY)
