--[[ standby_join.lua: put a person on a sold-out release's standby list, atomically.
Runs after lua/eligibility.lua (its `ineligible`).

KEYS (all under the release's hash tag {R}):
  1 meta        hash   closes_ms state left sex min_age max_age standby_seq
  2 slotday     hash   slot_id -> visit day YYYYMMDD
  3 holders     hash   person_id -> claim_id
  4 standby     zset   person_id -> join sequence (first to join first)
  5 standbywho  hash   person_id -> JSON {account_id, birth, sex, joined_at_ms, request_id}

ARGV: 1 person_id, 2 account_id, 3 birth (YYYYMMDD), 4 sex (F|M), 5 request_id

Reply: {status, position, length}, position counted from 1 (0 when not listed):
  "ok" (listed now) | "already_listed" | "already_claimed" | "not_sold_out" | "closed"
  | "not_found" | "not_eligible" (position "sex" or "age" instead)

Guarantees: one entry per person; only a person without a claim in the release joins, and
only while every slot is taken (`left` 0) and the release is not closed. Eligibility is
checked here (sex, and age on at least one slot's visit day) so the list holds only people
who may be booked; the handoff checks again for the slot it offers.
]]

local meta, slotday, holders, standby, who = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local person_id, account_id, birth, sex = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local m = redis.call('HMGET', meta, 'closes_ms', 'state', 'left', 'sex', 'min_age', 'max_age')
if not m[1] then return {'not_found', 0, 0} end
if m[2] == 'closed' or now >= tonumber(m[1]) then return {'closed', 0, 0} end

local rank = redis.call('ZRANK', standby, person_id)
if rank then return {'already_listed', rank + 1, redis.call('ZCARD', standby)} end
if redis.call('HEXISTS', holders, person_id) == 1 then return {'already_claimed', 0, 0} end
local why = ineligible(slotday, birth, sex, m[4], tonumber(m[5]), tonumber(m[6]))
if why then return {'not_eligible', why, 0} end
if tonumber(m[3]) > 0 then return {'not_sold_out', 0, 0} end

local seq = redis.call('HINCRBY', meta, 'standby_seq', 1)
redis.call('ZADD', standby, seq, person_id)
redis.call('HSET', who, person_id, cjson.encode({
  account_id = account_id, birth = tonumber(birth), sex = sex, joined_at_ms = now,
  request_id = ARGV[5],
}))
local length = redis.call('ZCARD', standby)
return {'ok', length, length}
