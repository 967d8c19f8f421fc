--[[ lottery_notify.lua: append a loser event to the outbox for each entry of a range
that the draw did not pick, atomically per range.

KEYS (all under the release's hash tag {R}):
  1 entries  list    "person_id|account_id|birth|sex", entry number = index + 1
  2 result   hash    winners (JSON list of entry numbers), notified (last entry done)
  3 outbox   stream  gets one "lottery.lost" event per loser (field e: event JSON)

ARGV: 1 release_id, 2 first entry number, 3 last entry number of the range

Reply: the number of events appended.

Guarantees: the events of a range and the progress mark `notified` are written together,
so a draw run again after a crash goes on after the last whole range (a range repeated
by two runs is one SMS each: the SMS consumer keeps one message per claim_id and kind).
Built in Redis rather than sent from Python: a million events cost seconds, not minutes.
]]

local entries, result, outbox = KEYS[1], KEYS[2], KEYS[3]
local release_id, first, last = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local won = {}
for _, n in ipairs(cjson.decode(redis.call('HGET', result, 'winners') or '[]')) do
  won[n] = true
end
local appended = 0
local rows = redis.call('LRANGE', entries, first - 1, last - 1)
for i, row in ipairs(rows) do
  local n = first + i - 1
  if not won[n] then
    local person_id, account_id = string.match(row, '^([^|]*)|([^|]*)|')
    redis.call('XADD', outbox, '*', 'type', 'lottery.lost', 'e', cjson.encode({
      claim_id = 'lottery-' .. release_id .. '-' .. n, release_id = release_id,
      person_id = person_id, account_id = account_id, entry = n,
    }))
    appended = appended + 1
  end
end
redis.call('HSET', result, 'notified', last)
return appended
