"""Kafka topic names: one place for every topic the service produces or consumes."""

CLAIMS = "slot.claims"
CANCELLATIONS = "slot.cancellations"
CLAIMS_DEAD_LETTER = "slot.claims.dlq"
SMS_DEAD_LETTER = "sms.dlq"
LOTTERY = "lottery.results"  # one event per entry the draw did not pick: its SMS
ADMISSIONS = "queue.admissions"  # one event per admission from a waiting room
STANDBY = "standby.notices"  # one event per person skipped on the standby list: its SMS

# Consumer groups (reconcile reads their progress).
BOOKINGS_GROUP = "bookings"
SMS_GROUP = "sms"

ALL = (CLAIMS, CANCELLATIONS, CLAIMS_DEAD_LETTER, SMS_DEAD_LETTER, LOTTERY, ADMISSIONS,
       STANDBY)
