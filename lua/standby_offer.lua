--[[ standby_offer.lua: one step of handing a cancelled slot to the standby list.

cancel.lua holds a cancelled slot for the list (a handoff record, the slot still counted
as taken, meta `held:<slot>` one higher). The gateway then repeats: this script picks the
first person on the list and records the offer in the handoff; the gateway reserves the
person's limits on the person's own Cluster slot and books them with claim.lua (mode
"standby", which takes the held slot). A refused person is skipped (told by SMS through
the outbox, the reason kept for their standby place); with the list empty the slot goes
back on sale. Each step is atomic and repeatable: a gateway that dies between steps
leaves the handoff record, which any gateway resumes (same person, same claim id).

KEYS (all under the release's hash tag {R}):
  1 meta        hash   left, held:<slot_id>
  2 taken       hash   slot_id -> active claims
  3 claims      hash   claim_id -> claim JSON
  4 standby     zset   person_id -> join sequence
  5 standbywho  hash   person_id -> JSON {account_id, birth, sex, joined_at_ms, request_id}
  6 handoffs    hash   handoff_id -> JSON {slot_id, at_ms, person_id?, claim_id?, who?}
  7 outbox      stream gets one "standby.skipped" event per refused offer (its SMS)
  8 left        hash   person_id -> JSON {reason, detail, at_ms}: why they left unbooked

ARGV: 1 handoff_id, 2 claim id for a new offer, 3 claim id of an offer that was refused
      ("" = none; the handoff's person is then dropped and the next one offered),
      4 why it was refused (a person_reserve.lua or claim.lua status), 5 its detail,
      6 release_id

Reply: {"offer", handoff JSON}   book handoff.person_id under handoff.claim_id
       {"granted", claim JSON}   the offer was booked; the handoff is finished
       {"returned", slot_id}     the list was empty: the slot is back on sale
       {"gone", ""}              no such handoff (finished by another gateway)

Guarantees: a refused offer is dropped, told and recorded together, once: a second caller
naming the same refused claim id finds the handoff moved on to the next person.
]]

local meta, taken, claims, standby, who, handoffs, outbox, left =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local handoff_id, fresh_claim_id, refused = ARGV[1], ARGV[2], ARGV[3]
local reason, detail, release_id = ARGV[4], ARGV[5], ARGV[6]

local raw = redis.call('HGET', handoffs, handoff_id)
if not raw then return {'gone', ''} end
local h = cjson.decode(raw)

if h.claim_id then
  local claim = redis.call('HGET', claims, h.claim_id)
  if claim then  -- booked (perhaps by a second gateway while this caller's try failed)
    redis.call('HDEL', handoffs, handoff_id)
    return {'granted', claim}
  end
  if h.claim_id ~= refused then return {'offer', raw} end
  -- Refused: the person leaves the list unbooked, told why by SMS, the reason kept.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', left, h.person_id,
    cjson.encode({reason = reason, detail = detail, at_ms = now}))
  redis.call('XADD', outbox, '*', 'type', 'standby.skipped', 'e', cjson.encode({
    claim_id = h.claim_id, release_id = release_id, person_id = h.person_id,
    account_id = h.who.account_id, reason = reason, detail = detail,
    request_id = h.who.request_id or '',
  }))
  h.person_id, h.claim_id, h.who = nil, nil, nil
end

while true do
  local first = redis.call('ZPOPMIN', standby)
  if #first == 0 then
    redis.call('HINCRBY', meta, 'held:' .. h.slot_id, -1)
    redis.call('HINCRBY', taken, h.slot_id, -1)
    redis.call('HINCRBY', meta, 'left', 1)
    redis.call('HDEL', handoffs, handoff_id)
    return {'returned', h.slot_id}
  end
  local person_id = first[1]
  local entry = redis.call('HGET', who, person_id)
  redis.call('HDEL', who, person_id)
  redis.call('HDEL', left, person_id)  -- an earlier skip no longer says where they stand
  if entry then
    h.person_id, h.claim_id, h.who = person_id, fresh_claim_id, cjson.decode(entry)
    local offer = cjson.encode(h)
    redis.call('HSET', handoffs, handoff_id, offer)
    return {'offer', offer}
  end
end
