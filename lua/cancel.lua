--[[ cancel.lua: cancel one claim of a release and give its slot back, atomically.

KEYS (all under the release's hash tag {R}):
  1 meta       hash   (left)
  2 taken      hash   slot_id -> active claims
  3 holders    hash   person_id -> claim_id
  4 claims     hash   claim_id -> claim JSON
  5 outbox     stream
  6 deadline   hash   slot_id -> last moment (ms) a booking of the slot may be cancelled
  7 cancelled  hash   slot_id -> cancellations
  8 standby    zset   person_id -> join sequence (the standby list)
  9 handoffs   hash   handoff_id -> JSON: cancelled slots held for the standby list

ARGV: 1 claim_id, 2 account_id (the caller: another account's claim is "not_found"),
      3 "cancel", or "decline": a standby booking given up within its decline window
      (no cancellation deadline then; any other booking is "not_declinable")

Reply: {"ok", claim JSON, "returned" | "held"} | {"not_found", ""}
       | {"already_cancelled", claim JSON} | {"not_cancellable", status}
       | {"cancel_deadline_passed", deadline_ms} | {"not_declinable", decline_until_ms}

Guarantees: checks before writes; the slot's stock goes up by exactly one, once; the person
may claim again in this release; a claim.cancelled event joins the outbox with the claim.
The deadline is checked against Redis TIME. With people on the standby list the slot is
not put back on sale but held for them ("held": a handoff record named by this claim id,
meta `held:<slot>` one higher, taken unchanged); standby_offer.lua hands it on.
]]

local meta, taken, holders, claims, outbox, deadline, cancelled =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local standby, handoffs = KEYS[8], KEYS[9]
local claim_id, account_id, mode = ARGV[1], ARGV[2], ARGV[3]

local raw = redis.call('HGET', claims, claim_id)
if not raw then return {'not_found', ''} end
local claim = cjson.decode(raw)
if claim.account_id ~= account_id then return {'not_found', ''} end
if claim.status == 'cancelled' then return {'already_cancelled', raw} end
if claim.status ~= 'confirmed' then return {'not_cancellable', claim.status} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mode == 'decline' then
  local until_ms = tonumber(claim.decline_until_ms or 0)
  if claim.via ~= 'standby' or now > until_ms then
    return {'not_declinable', tostring(until_ms)}
  end
else
  local last = tonumber(redis.call('HGET', deadline, claim.slot_id) or '0')
  if now > last then return {'cancel_deadline_passed', tostring(last)} end
end

claim.status = 'cancelled'
claim.cancelled_at_ms = now
local updated = cjson.encode(claim)
redis.call('HSET', claims, claim_id, updated)
redis.call('HINCRBY', cancelled, claim.slot_id, 1)
local slot_goes = 'returned'
if redis.call('ZCARD', standby) > 0 then
  slot_goes = 'held'
  redis.call('HINCRBY', meta, 'held:' .. claim.slot_id, 1)
  redis.call('HSET', handoffs, claim_id, cjson.encode({slot_id = claim.slot_id, at_ms = now}))
else
  redis.call('HINCRBY', taken, claim.slot_id, -1)
  redis.call('HINCRBY', meta, 'left', 1)
end
if redis.call('HGET', holders, claim.person_id) == claim_id then
  redis.call('HDEL', holders, claim.person_id)
end
redis.call('XADD', outbox, '*', 'type', 'claim.cancelled', 'e', updated)
return {'ok', updated, slot_goes}
