"""Kafka topic names: one place for every topic the service produces or consumes."""

CLAIMS = "slot.claims"
CANCELLATIONS = "slot.cancellations"
CLAIMS_DEAD_LETTER = "slot.claims.dlq"
SMS_DEAD_LETTER = "sms.dlq"

ALL = (CLAIMS, CANCELLATIONS, CLAIMS_DEAD_LETTER, SMS_DEAD_LETTER)
