--[[ queue_advance.lua: the prologue of every queue script (queue_join and queue_status
are this file followed by their own part; lua/claim.lua checks and spends admissions). It
advances the waiting room to Redis TIME, so no ticker or leader is needed: whichever call
comes first does the work, and a process that dies leaves nothing half-done.

KEYS (all under the release's hash tag {R}, one Redis Cluster slot):
  1 meta   hash  mode opens_ms closes_ms state waves slots left and the q_* fields
  2 cap    hash  slot_id -> capacity       3 taken hash slot_id -> active claims
  4 pre    list  persons who joined before opening, in arrival order
  5 line   list  persons still waiting, in admission order (head = next)
  6 pos    hash  person -> place in the admission order (1-based, never reused)
  7 who    hash  person -> "w" waiting | "a:<jti>:<expires_ms>" admitted | "u" token used
                  (or the person held a claim when their turn came) | "x" token expired
                  unused
  8 live   zset  jti -> expires_ms of admissions not yet finished (unused or claiming)
  9 jtis   hash  jti -> person (unused) | "u:"..person (used) | "x:"..person (expired)
  10 outbox stream the release's outbox: one "queue.admitted" event per admission (its
                   dedup id in claim_id, as every outbox event), persisted by the
                   bookings consumer
  11 holders hash  person -> claim_id (lua/claim.lua): a person who holds a claim is
                   not admitted (after Redis lost writes, reconcile writes claims back
                   for persons the room had not yet seen claim)

Steps, in order: (1) at opening, the pre-queue is shuffled (Fisher-Yates driven by the
Park-Miller generator seeded with q_seed; release_service/modes/queue.py repeats it for
audits) and becomes the head of the line; (2) admissions past their expiry leave `live`,
an unused one is returned (its place goes to the next person); (3) while the release is
open, persons are admitted from the head of the line at q_rate per second (at most one
second's worth at once) and only while unfinished admissions stay at or below
ceil(q_factor x stock released and left).

ARGV: the script's own part reads them (queue_join.lua, queue_status.lua).

Reply: {"not_found"} (no such release) | {"not_queue"} (its mode is not queue), before any
step; else what the script's own part returns, in the end `report`'s 15 values:
  1 status      the person's: "waiting" | "admitted" | "used" | "expired" | "none"
  2 ahead       persons ahead when waiting; -1 before the shuffle or for "none", else 0
  3 jti         "" unless admitted          4 expires_ms   0 unless admitted
  5 release     "open" | "not_open" | "paused" | "wave_sold_out" | "sold_out" | "closed"
  6 available   stock released and not taken
  7 left        stock not taken (meta left, every wave)
  8 next_wave   the next wave's time (ms), "" when none is due
  9 waiting     persons in the pre-queue and the line
  10 admitted   admissions made by this call
  11 returned   admissions returned by this call (expired unused)
  12 now        Redis TIME (ms)             13 rate        q_rate, as text
  14 head       places of the admission order passed so far (q_head)
  15 joined     1 when this call made the person's entry, else 0
]]

local meta, cap, taken, pre, line, pos, who, live, jtis, outbox, holders =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]
local release_id = string.match(meta, '{(.-)}')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local m = redis.call('HMGET', meta, 'mode', 'opens_ms', 'closes_ms', 'state', 'waves', 'slots',
  'left', 'q_join_ms', 'q_factor', 'q_rate', 'q_token_ms', 'q_seed', 'q_shuffled', 'q_head',
  'q_tail', 'q_allow', 'q_adv_ms')
if not m[1] then return {'not_found'} end
if m[1] ~= 'queue' then return {'not_queue'} end
local opens, closes, state = tonumber(m[2]), tonumber(m[3]), m[4]
local left = tonumber(m[7])
local join_ms, factor, rate, token_ms = tonumber(m[8]), tonumber(m[9]), tonumber(m[10]),
  tonumber(m[11])
local seed, shuffled, head, tail = tonumber(m[12]), m[13] == '1', tonumber(m[14]),
  tonumber(m[15])
local allow, adv_ms = tonumber(m[16]), tonumber(m[17])
local closed = state == 'closed' or now >= closes

-- (1) The shuffle at opening.
if not shuffled and now >= opens then
  local order = redis.call('LRANGE', pre, 0, -1)
  local x = seed
  for i = #order, 2, -1 do
    x = (x * 48271) % 2147483647
    local j = x % i + 1
    order[i], order[j] = order[j], order[i]
  end
  for i = 1, #order do
    redis.call('RPUSH', line, order[i])
    redis.call('HSET', pos, order[i], tail + i)
  end
  redis.call('DEL', pre)
  tail, shuffled, adv_ms, allow = tail + #order, true, opens, 0
  redis.call('HSET', meta, 'q_shuffled', 1, 'q_tail', tail, 'q_adv_ms', adv_ms, 'q_allow', 0)
end

-- (2) Expired admissions.
local returned = 0
for _, jti in ipairs(redis.call('ZRANGEBYSCORE', live, '-inf', now)) do
  redis.call('ZREM', live, jti)
  local holder = redis.call('HGET', jtis, jti)
  if holder and string.sub(holder, 2, 2) ~= ':' then
    redis.call('HSET', jtis, jti, 'x:' .. holder)
    redis.call('HSET', who, holder, 'x')
    returned = returned + 1
  end
end

-- Stock released so far (waves) and not taken; the next wave's time when one is due.
local released_ppm, next_wave = 0, ''
for wt, ppm in string.gmatch(m[5], '(%d+),(%d+)') do
  if tonumber(wt) <= now then released_ppm = tonumber(ppm)
  elseif next_wave == '' then next_wave = wt end
end
local available = 0
for s in string.gmatch(m[6], '[^,]+') do
  local c = tonumber(redis.call('HGET', cap, s) or '0')
  local a = math.floor(c * released_ppm / 1000000) - tonumber(redis.call('HGET', taken, s) or '0')
  if a > 0 then available = available + a end
end

-- (3) Admission (queue_join calls it again once the new person is in line).
local admitted = 0
local function admit()
  if not shuffled or closed or state == 'paused' then return end
  local burst = math.max(1, rate)
  allow = math.min(burst, allow + (now - adv_ms) * rate / 1000)
  adv_ms = now
  local room = math.ceil(factor * available) - redis.call('ZCARD', live)
  local k, n = math.min(math.floor(allow), room), 0
  while n < k do
    local person = redis.call('LPOP', line)
    if not person then break end
    head = head + 1  -- a place in the order, admitted or not
    if redis.call('HEXISTS', holders, person) == 1 then
      redis.call('HSET', who, person, 'u')  -- booked already: nothing to admit
    else
      local jti = string.sub(redis.sha1hex(seed .. ':' .. head .. ':' .. person), 1, 24)
      local expires = now + token_ms
      redis.call('HSET', who, person, 'a:' .. jti .. ':' .. expires)
      redis.call('HSET', jtis, jti, person)
      redis.call('ZADD', live, expires, jti)
      redis.call('XADD', outbox, '*', 'type', 'queue.admitted', 'e', cjson.encode({
        claim_id = 'admission-' .. jti, admission_id = jti, release_id = release_id,
        person_id = person, position = head, admitted_at_ms = now, expires_at_ms = expires}))
      n = n + 1
    end
  end
  admitted = admitted + n
  allow = allow - n
  redis.call('HSET', meta, 'q_allow', tostring(allow), 'q_adv_ms', now, 'q_head', head)
end
admit()

-- A person's standing: state, persons ahead (-1 before the shuffle), jti, expires_ms.
local function standing(person)
  local w = redis.call('HGET', who, person)
  if not w then return 'none', -1, '', 0 end
  if w == 'w' then
    if not shuffled then return 'waiting', -1, '', 0 end
    return 'waiting', tonumber(redis.call('HGET', pos, person)) - head - 1, '', 0
  end
  if string.sub(w, 1, 2) == 'a:' then
    local jti, expires = string.match(w, '^a:([^:]+):(%d+)$')
    return 'admitted', 0, jti, tonumber(expires)
  end
  if w == 'u' then return 'used', 0, '', 0 end
  return 'expired', 0, '', 0
end

-- The reply of queue_join and queue_status: the person's standing, then the room's.
-- `joined` is 1 when this call made the person's entry.
local function report(person, joined)
  local status, ahead, jti, expires = standing(person)
  local waiting = redis.call('LLEN', line) + redis.call('LLEN', pre)
  local release_state = 'open'
  if closed then release_state = 'closed'
  elseif left <= 0 then release_state = 'sold_out'
  elseif available <= 0 then release_state = 'wave_sold_out'
  elseif now < opens then release_state = 'not_open'
  elseif state == 'paused' then release_state = 'paused' end
  return {status, ahead, jti, expires, release_state, available, left, next_wave, waiting,
    admitted, returned, now, tostring(rate), head, joined}
end
