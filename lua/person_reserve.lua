--[[ person_reserve.lua: check a person's bans and booking limits and reserve a booking,
atomically, on the person's own Cluster slot (hash tag {person_id}).

Limits span releases, whose keys live on other slots, so a claim is reserve-then-claim:
this script runs first and records the booking-to-be; the gateway removes the reservation
(an HDEL of the claim id: ReserveScript.unreserve) when the release's claim script refuses. Two concurrent claims of one
person in two releases are serialised here, so a limit of 1 is never passed twice.
Fail closed: a reservation left by a crashed gateway still counts until reconcile removes it.

A batch of persons per call (the gateway groups a tick's claims by Cluster slot; on a
single Redis that is one call), two keys per person:
KEYS: 2i-1 active  hash  claim_id -> "release_id|day|clinic|department|claimed_ms"
      2i   ban     string: banned until (ms); "removed" once the person left the account
ARGV: one value per person, 9 fields joined by "\31": claim_id release_id day (YYYYMMDD)
      clinic department same_day_clinic per_day per_7_days per_3_months (-1 = no limit)

Reply: a flat array, two values per person, in order:
       "ok", "" | "banned", until_ms | "already_claimed", the claim id reserved before
       | "removed", ""
       | "limit_reached", "same_day_clinic" | "per_day" | "per_7_days" | "per_3_months"
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local week, quarter = now - 7 * 86400000, now - 90 * 86400000
local names = {'same_day_clinic', 'per_day', 'per_7_days', 'per_3_months'}

local function reserve(active, ban, a)
  local claim_id, release_id, day, clinic, dept = a[1], a[2], a[3], a[4], a[5]
  local limits = {a[6], a[7], a[8], a[9]}  -- in the order of `names`
  local ban_value = redis.call('GET', ban)
  -- Tokens issued before a person was removed still name them: refuse here, no I/O there.
  if ban_value == 'removed' then return 'removed', '' end
  local until_ms = tonumber(ban_value or '0')
  if now < until_ms then return 'banned', tostring(until_ms) end

  local counts = {1, 1, 1, 1}  -- the booking being made
  local entries = redis.call('HGETALL', active)
  for i = 2, #entries, 2 do
    local r, d, c, dp, at = string.match(entries[i], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%d+)$')
    if r == release_id then return 'already_claimed', entries[i - 1] end
    if d == day then
      counts[2] = counts[2] + 1
      if c == clinic and dp == dept then counts[1] = counts[1] + 1 end
    end
    at = tonumber(at)
    if at >= week then counts[3] = counts[3] + 1 end
    if at >= quarter then
      counts[4] = counts[4] + 1
    else
      redis.call('HDEL', active, entries[i - 1])  -- outside every window now
    end
  end
  for k = 1, 4 do
    local limit = tonumber(limits[k])
    if limit >= 0 and counts[k] > limit then return 'limit_reached', names[k] end
  end
  redis.call('HSET', active, claim_id,
    table.concat({release_id, day, clinic, dept, tostring(now)}, '|'))
  return 'ok', ''
end

local function fields(packed)
  local out, start = {}, 1
  while true do
    local stop = string.find(packed, '\31', start, true)
    if not stop then out[#out + 1] = string.sub(packed, start); return out end
    out[#out + 1] = string.sub(packed, start, stop - 1)
    start = stop + 1
  end
end

local reply = {}
for i = 0, #KEYS / 2 - 1 do
  local status, detail = reserve(KEYS[2 * i + 1], KEYS[2 * i + 2], fields(ARGV[i + 1]))
  reply[#reply + 1] = status
  reply[#reply + 1] = detail
end
return reply
