--[[ lottery_enter.lua: accept one lottery entry for a release, atomically.
Runs after lua/eligibility.lua (its `ineligible`).

KEYS (all under the release's hash tag {R}):
  1 meta     hash  opens_ms closes_ms state sex min_age max_age mode
  2 slotday  hash  slot_id -> visit day YYYYMMDD
  3 entries  list  "person_id|account_id|birth|sex", in the order accepted
  4 people   hash  person_id -> entry number
  5 result   hash  the draw's result (present: the draw has begun)

ARGV: 1 person_id, 2 account_id, 3 birth (YYYYMMDD), 4 sex (F|M)

Reply: {"ok", entry number} | {"already_entered", entry number} | {"not_open", opens_ms}
       | {"closed", ""} | {"paused", ""} | {"not_found", ""} | {"not_eligible", "sex"|"age"}
       | {"not_lottery", ""} (the release's mode is not "lottery")

Guarantees: one entry per person; entries only between opens_ms and closes_ms (the draw
time) by Redis TIME, never once the draw has begun; entry numbers are 1, 2, 3... with no
gap, so the draw's input is exactly the list.
]]

local meta, slotday, entries, people, result = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local person_id, account_id, birth, sex = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local m = redis.call('HMGET', meta, 'opens_ms', 'closes_ms', 'state', 'sex', 'min_age',
  'max_age', 'mode')
if not m[1] then return {'not_found', ''} end
if m[7] ~= 'lottery' then return {'not_lottery', ''} end
if m[3] == 'closed' or now >= tonumber(m[2]) or redis.call('EXISTS', result) == 1 then
  return {'closed', ''}
end
if now < tonumber(m[1]) then return {'not_open', m[1]} end
if m[3] == 'paused' then return {'paused', ''} end

local known = redis.call('HGET', people, person_id)
if known then return {'already_entered', known} end
local why = ineligible(slotday, birth, sex, m[4], tonumber(m[5]), tonumber(m[6]))
if why then return {'not_eligible', why} end

local n = redis.call('RPUSH', entries, table.concat({person_id, account_id, birth, sex}, '|'))
redis.call('HSET', people, person_id, n)
return {'ok', n}
