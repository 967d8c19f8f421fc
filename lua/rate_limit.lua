--[[ rate_limit.lua: fixed-window request counters, a batch of them on one Cluster slot.

KEYS: the counters (one per rule and subject, e.g. rl:{account:a_1}:lookups).
ARGV: three values per key, in order: limit, window_ms, cost.
  cost 0 only reads the counter (a "peek": is a miss budget already spent?).
Reply: one integer per key: 0 within the limit, else the milliseconds until its window
ends (the client's Retry-After).

A refused request still counts, so a client that keeps hammering stays refused until the
window ends. INCRBY and PEXPIRE run together here: a counter never outlives its window
(INCR then EXPIRE as two calls leaves a counter without expiry if the caller dies between).
]]

local reply = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local count
  if cost == 0 then
    count = tonumber(redis.call('GET', key) or '0')
  else
    count = redis.call('INCRBY', key, cost)
    if count == cost then
      redis.call('PEXPIRE', key, window)
    end
  end
  local wait = 0
  if count > limit then
    wait = redis.call('PTTL', key)
    if wait < 0 then  -- no expiry (cannot happen from here; repair rather than lock out)
      redis.call('PEXPIRE', key, window)
      wait = window
    end
  end
  reply[i] = wait
end
return reply
