"""What an SMS says: the job (one message per booking and kind), what it needs to know
besides the code, and the text. Used by the SMS consumer and by the gateway's direct sends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo

import asyncpg

NOTICES = ("lottery_lost", "standby_skipped")  # name no booking: no code, no slot
# Why a standby offer was refused (`reason` or `reason:detail` of the event), as told.
SKIP_REASONS = {
    "limit_reached:same_day_clinic": "您当天在该门诊已有预约",
    "limit_reached:per_day": "您当天的预约已达上限",
    "limit_reached:per_7_days": "您7天内的预约已达上限",
    "limit_reached:per_3_months": "您3个月内的预约已达上限",
    "banned": "您暂时不能预约",
    "already_claimed": "您在本次放号中已有预约",
    "not_eligible": "您不符合该时段的接种条件",
}
WEEKDAYS = "一二三四五六日"
_MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class SmsJob:
    claim_id: str
    kind: str  # "confirmation", "cancellation", or a notice (NOTICES: no code, no slot)
    code: str
    release_id: str
    slot_id: str
    account_id: str
    request_id: str = ""
    # A confirmation of a slot handed over from the standby list: until when the person may
    # decline it (0: an ordinary booking). Same kind, so still one confirmation per booking.
    decline_until_ms: int = 0
    skip_reason: str = ""  # standby_skipped: "reason" or "reason:detail" (SKIP_REASONS)

    @property
    def message_id(self) -> str:
        """The provider's client message id: one message per booking and kind."""
        return f"{self.claim_id}:{self.kind}"


@dataclass(frozen=True, slots=True)
class SmsContext:
    """What a message says besides the code; never the person's name or ID number."""

    phone: str
    vaccine: str
    dose: int
    clinic_id: str
    department: str
    starts_at: datetime | None  # None: a lottery notice, which names no slot


def render(job: SmsJob, context: SmsContext, zone: tzinfo) -> str:
    """The message text, the slot's time in the clinic's zone (`settings.zone`)."""
    place = f"{context.clinic_id}{context.department}"
    vaccine = f"{context.vaccine}第{context.dose}剂"
    if job.kind == "standby_skipped":
        why = SKIP_REASONS.get(job.skip_reason) or SKIP_REASONS.get(
            job.skip_reason.split(":")[0], "您的预约条件不满足")
        return (f"【疫苗预约】{place}的{vaccine}有名额转给候补，但{why}，"
                "名额已转给下一位候补者，您已离开候补名单。")
    if job.kind == "lottery_lost" or context.starts_at is None:
        return (f"【疫苗预约】很遗憾，您在{place}登记的{vaccine}摇号未中签。"
                "摇号种子与结果已公布，可查验。")
    at = context.starts_at.astimezone(zone)
    when = f"{at.month}月{at.day}日 {at:%H:%M}（周{WEEKDAYS[at.weekday()]}）"
    if job.kind == "confirmation" and job.decline_until_ms:
        until = datetime.fromtimestamp(job.decline_until_ms / 1000, zone)
        return (f"【疫苗预约】候补成功：已为您预约{vaccine}：{place}，{when}，"
                f"预约码 {job.code}。如不需要，请在{until.month}月{until.day}日 {until:%H:%M}"
                "前放弃，名额将转给下一位候补者。")
    if job.kind == "cancellation":
        return (f"【疫苗预约】您在{place}{when}的{vaccine}预约（预约码 {job.code}）已取消，"
                "名额已释放。")
    return (f"【疫苗预约】您已成功预约{vaccine}：{place}，{when}，预约码 {job.code}。"
            "请按时携带身份证件到场接种。如需取消请在截止时间前操作。")


_CONTEXT = """
SELECT c.claim_id, c.slot_id, a.phone, r.vaccine, r.dose, r.clinic_id, r.department, s.starts_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     AS c(claim_id, account_id, release_id, slot_id)
LEFT JOIN accounts a ON a.account_id = c.account_id
LEFT JOIN releases r ON r.release_id = c.release_id
LEFT JOIN slots s ON s.release_id = c.release_id AND s.slot_id = c.slot_id
"""


async def load_contexts(pool: asyncpg.Pool, jobs: Sequence[SmsJob]) -> dict[str, SmsContext]:
    """Phone, release and slot of each job's booking (by claim id), in one query; a claim
    whose account (or phone), release or slot is unknown is absent."""
    if not jobs:
        return {}
    rows = await pool.fetch(
        _CONTEXT, [j.claim_id for j in jobs], [j.account_id for j in jobs],
        [j.release_id for j in jobs], [j.slot_id for j in jobs])
    return {
        r["claim_id"]: SmsContext(r["phone"], r["vaccine"], r["dose"], r["clinic_id"],
                                  r["department"], r["starts_at"])
        for r in rows
        if r["phone"] and r["vaccine"] is not None
        and (r["starts_at"] is not None or r["slot_id"] == "")
    }
