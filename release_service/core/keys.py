"""Every Redis key shape, in one place.

All keys of one release carry the hash tag `{release_id}`, so one script touches one Redis
Cluster slot. Release keys live as long as the release (deleted by an operator's purge);
none of them expires on its own, because they are the claim path's system of record until
the bookings are in PostgreSQL.
"""

from __future__ import annotations


def _rel(release_id: str, what: str) -> str:
    return f"rel:{{{release_id}}}:{what}"


def meta_key(release_id: str) -> str:
    """Hash: window, state, waves, eligibility, totals, code range. Lifetime: release."""
    return _rel(release_id, "meta")


def capacity_key(release_id: str) -> str:
    """Hash slot_id -> capacity. Lifetime: release."""
    return _rel(release_id, "cap")


def taken_key(release_id: str) -> str:
    """Hash slot_id -> active claims on the slot (remaining = capacity - taken)."""
    return _rel(release_id, "taken")


def slot_day_key(release_id: str) -> str:
    """Hash slot_id -> visit day as YYYYMMDD (clinic time), for age and per-day rules."""
    return _rel(release_id, "slotday")


def holders_key(release_id: str) -> str:
    """Hash person_id -> claim_id of the person's active claim in this release."""
    return _rel(release_id, "holders")


def claims_key(release_id: str) -> str:
    """Hash claim_id -> claim JSON. Lifetime: release."""
    return _rel(release_id, "claims")


def codes_key(release_id: str) -> str:
    """Hash booking code -> claim_id, for lookups by code."""
    return _rel(release_id, "codes")


def idempotency_key(release_id: str) -> str:
    """Hash "account_id:Idempotency-Key" -> claim_id."""
    return _rel(release_id, "idem")


def outbox_key(release_id: str) -> str:
    """Stream of claim/cancel events; an entry is trimmed once its booking is in PostgreSQL."""
    return _rel(release_id, "outbox")


def document_key(release_id: str) -> str:
    """String: the public release document (JSON) written at preheat."""
    return _rel(release_id, "doc")


def deadline_key(release_id: str) -> str:
    """Hash slot_id -> last moment (ms) a booking of the slot may be cancelled."""
    return _rel(release_id, "deadline")


def cancelled_key(release_id: str) -> str:
    """Hash slot_id -> cancellations so far."""
    return _rel(release_id, "cancelled")


def claim_rate_key(release_id: str, per: str, subject: str) -> str:
    """String: claims of one account or client address in this release in the current
    window (lua/claim.lua counts them). Expires with its window."""
    return _rel(release_id, f"rl:claims:{per}:{subject}")


def standby_key(release_id: str) -> str:
    """Sorted set person_id -> join sequence: the standby list, first to join first.
    Lifetime: release; a person leaves it when offered a cancelled slot."""
    return _rel(release_id, "standby")


def standby_people_key(release_id: str) -> str:
    """Hash person_id -> JSON (account, birth, sex, joined) of each standby entry."""
    return _rel(release_id, "standbywho")


def standby_left_key(release_id: str) -> str:
    """Hash person_id -> JSON {reason, detail, at_ms}: why the person last left the list
    without the slot offered (refused by a limit or eligibility)."""
    return _rel(release_id, "standbyleft")


def handoffs_key(release_id: str) -> str:
    """Hash handoff_id (the cancelled claim's id) -> JSON: a cancelled slot held for the
    standby list until it is booked by the next person or goes back on sale."""
    return _rel(release_id, "handoffs")


def lottery_entries_key(release_id: str) -> str:
    """List of "person_id|account_id|birth|sex": lottery entries in the order accepted;
    entry number = index + 1. Lifetime: release."""
    return _rel(release_id, "lottery:entries")


def lottery_people_key(release_id: str) -> str:
    """Hash person_id -> entry number: one entry per person."""
    return _rel(release_id, "lottery:people")


def lottery_seed_key(release_id: str) -> str:
    """Hash: seed (decimal), committed_at_ms. Written once when the release is created; its
    SHA-256 is public from then on, the seed itself only with the draw's result."""
    return _rel(release_id, "lottery:seed")


def lottery_result_key(release_id: str) -> str:
    """Hash: entries, algorithm, drawn_at_ms, state (drawing, notifying, drawn), cursor,
    winners and skipped (JSON). Written once by the draw; the published result."""
    return _rel(release_id, "lottery:result")


def lottery_lock_key(release_id: str) -> str:
    """String with a time-out: the one process drawing this release's lottery."""
    return _rel(release_id, "lottery:lock")


def queue_keys(release_id: str) -> dict[str, str]:
    """The waiting room of a `mode: queue` release (lua/queue_advance.lua describes each):
    pre (list), line (list), pos (hash), who (hash), live (sorted set), jtis (hash)."""
    return {what: _rel(release_id, f"q:{what}")
            for what in ("pre", "line", "pos", "who", "live", "jtis")}


# Person keys: hash tag {person_id}, the person's own Cluster slot (limits across releases).


def person_active_key(person_id: str) -> str:
    """Hash claim_id -> "release|day|clinic|department|claimed_ms" of active bookings.
    Lifetime: entries leave on cancel, check-in, no-show, or 90 days after booking."""
    return f"person:{{{person_id}}}:active"


def person_ban_key(person_id: str) -> str:
    """String: banned from booking until (ms); expires with the ban."""
    return f"person:{{{person_id}}}:ban"


# One-time login codes: hash tag {phone}.


def otp_code_key(phone: str) -> str:
    """Hash {digest, tries} of the code last sent to the phone; expires with the code
    (lua/otp_verify.lua deletes it once used or burned)."""
    return f"otp:{{{phone}}}:code"


def otp_cooldown_key(phone: str) -> str:
    """String: a code was sent to the phone a moment ago; expires with the cool-down."""
    return f"otp:{{{phone}}}:cooldown"


# Keys outside any release slot (never touched by a claim script).

RELEASE_INDEX_KEY = "releases:index"
"""Sorted set release_id -> closes_at (ms): every release the gateways and relay serve."""

RELEASE_EVENTS_CHANNEL = "releases:events"
"""Pub/sub channel: a release id whose state changed (pause, resume, close, sold out)."""

OUTBOX_GROUP = "relay"
"""Consumer group name of the relays on every outbox stream."""


def relay_heartbeat_key(relay_name: str) -> str:
    """String: a relay's last read (ms), written before it waits for the replicas.
    Lifetime: a minute."""
    return f"relay:{relay_name}:heartbeat"
