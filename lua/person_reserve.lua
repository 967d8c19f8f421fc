--[[ person_reserve.lua: check a person's bans and booking limits and reserve a booking,
atomically, on the person's own Cluster slot (hash tag {person_id}).

Limits span releases, whose keys live on other slots, so a claim is reserve-then-claim:
this script runs first and records the booking-to-be; the gateway removes the reservation
(person_release.lua) when the release's claim script refuses. Two concurrent claims of one
person in two releases are serialised here, so a limit of 1 is never passed twice.
Fail closed: a reservation left by a crashed gateway still counts until reconcile removes it.

KEYS: 1 active  hash  claim_id -> "release_id|day|clinic|department|claimed_ms"
      2 ban     string: banned until (ms); "removed" once the person left the account
ARGV: 1 claim_id  2 release_id  3 day (YYYYMMDD)  4 clinic  5 department
      6 same_day_clinic  7 per_day  8 per_7_days  9 per_3_months   (limits; -1 = none)

Reply: {"ok", ""} | {"banned", until_ms} | {"already_claimed", ""} | {"removed", ""}
       | {"limit_reached", "same_day_clinic" | "per_day" | "per_7_days" | "per_3_months"}
]]

local active, ban = KEYS[1], KEYS[2]
local claim_id, release_id, day, clinic, dept =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local limits = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local names = {'same_day_clinic', 'per_day', 'per_7_days', 'per_3_months'}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local ban_value = redis.call('GET', ban)
-- Tokens issued before a person was removed still name them: refuse here, no I/O there.
if ban_value == 'removed' then return {'removed', ''} end
local until_ms = tonumber(ban_value or '0')
if now < until_ms then return {'banned', tostring(until_ms)} end

local week, quarter = now - 7 * 86400000, now - 90 * 86400000
local counts = {1, 1, 1, 1}  -- the booking being made
local entries = redis.call('HGETALL', active)
for i = 2, #entries, 2 do
  local r, d, c, dp, at = string.match(entries[i], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%d+)$')
  if r == release_id then return {'already_claimed', ''} end
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
  if limits[k] >= 0 and counts[k] > limits[k] then return {'limit_reached', names[k]} end
end

redis.call('HSET', active, claim_id,
  table.concat({release_id, day, clinic, dept, tostring(now)}, '|'))
return {'ok', ''}
