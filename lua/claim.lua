--[[ claim.lua: claim slots of one release for a batch of persons, atomically.

KEYS (all under the release's hash tag {R}, so one Redis Cluster slot):
  1 meta      hash  opens_ms closes_ms state waves min_age max_age sex slots left mode
                    code_next code_end, held:<slot_id> (units cancel.lua held for the
                    standby list, taken by a claim in mode "standby")
  2 cap       hash  slot_id -> capacity
  3 taken     hash  slot_id -> active claims
  4 slotday   hash  slot_id -> visit day YYYYMMDD
  5 holders   hash  person_id -> claim_id
  6 claims    hash  claim_id -> claim JSON
  7 codes     hash  code -> claim_id
  8 idem      hash  "account_id:key" -> claim_id
  9 outbox    stream of events (field e: event JSON)
  10 q_who, 11 q_live, 12 q_jtis: the waiting room's admissions (lua/queue_advance.lua)
  13.. claim rate counters (strings, rel:{R}:rl:claims:<per>:<subject>), each expiring
       with its window; a claim names the ones it counts against (field 11 below)

ARGV:
  1 release_id
  2..5 code permutation keys (integers below 10^6, from the server's code secret)
  6 n, the number of claims in this batch
  then one value per claim, 13 fields joined by "\31" (one argument is cheaper to send
  than thirteen): claim_id account_id person_id slot_id ("" = any slot)
              idempotency_key ("" = none) birth (YYYYMMDD) sex (F|M)
              day (YYYYMMDD: any slot on that visit day only; "" = any day)
              mode ("claim"; "replay": only answer an idempotent replay; "standby": take
                    a slot cancel.lua held for the standby list, window not checked;
                    "draw": a lottery winner, after the entry window, so not checked)
              request_id (carried in the claim and its event, for tracing)
              limits ("key_index,limit,window_ms" entries joined by " "; "" = none)
              decline_ms (mode "standby": how long the person may decline; "" otherwise)
              admission (the jti of the person's admission: required by a claim of a
                    queue-mode release, checked and spent here with the claim)

Reply: a flat array, two values per claim, in order:
  "ok", claim JSON          claimed now
  "replay", claim JSON      the idempotency key was seen: the earlier claim, nothing taken
  "already_claimed", JSON   the person already holds a claim in this release
  "not_open", opens_ms | "paused", "" | "closed", "" | "not_found", ""
  "sold_out", next_wave_ms or ""   (next wave: stock is left but not yet released)
  "unknown_slot", "" | "not_eligible", reason | "codes_exhausted", ""
  | "day_full", a visit day with stock (no slot left on the claim's day; others have some)
  "no_replay", ""           mode "replay" and the key was not seen: nothing done
  "rate_limited", "wait_ms,i"  the claim's i-th limit is spent for wait_ms more ms
  "admission", reason       queue mode, no usable admission: missing, invalid, used,
                            expired

Guarantees: every check runs before the first write of a claim (Redis does not roll back
a script that fails half-way); a slot's taken count never exceeds its released share of
capacity; a person holds at most one active claim per release; every write of a claim
(stock, holder, claim, code, idempotency key, outbox event) happens together or not at
all. Rate counters are not part of a claim: every claim attempt that is not a replay
spends them (a refused attempt too, as lua/rate_limit.lua), before any other check;
counting them here, on the release's slot, costs the claim no extra round trip. The clock
is Redis TIME: one clock for every gateway. Cost per claim is O(1) except
the any-slot search, which is O(slots of the release).
]]

local meta, cap, taken, slotday, holders, claims, codes, idem, outbox =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local q_who, q_live, q_jtis = KEYS[10], KEYS[11], KEYS[12]

local release_id = ARGV[1]
local k1, k2, k3, k4 = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local reply = {}

local m = redis.call('HMGET', meta, 'opens_ms', 'closes_ms', 'state', 'waves', 'min_age',
  'max_age', 'sex', 'slots', 'mode')
if not m[1] then
  for _ = 1, n do
    reply[#reply + 1] = 'not_found'; reply[#reply + 1] = ''
  end
  return reply
end

local opens, closes, state = tonumber(m[1]), tonumber(m[2]), m[3]
local queued = m[9] == 'queue'
local min_age, max_age, need_sex = tonumber(m[5]), tonumber(m[6]), m[7]

-- Window status, the same for every claim of the batch.
local window, window_arg = 'open', ''
if state == 'closed' or now >= closes then
  window = 'closed'
elseif now < opens then
  window, window_arg = 'not_open', tostring(opens)
elseif state == 'paused' then
  window = 'paused'
end

-- Released share of capacity (parts per million) and the next wave's time.
-- waves = "t1,ppm1,t2,ppm2,...": cumulative share released at each time.
local released_ppm, next_wave = 0, ''
for wt, ppm in string.gmatch(m[4], '(%d+),(%d+)') do
  if tonumber(wt) <= now then
    released_ppm = tonumber(ppm)
  elseif next_wave == '' then
    next_wave = wt
  end
end

local function available(slot)
  local c = tonumber(redis.call('HGET', cap, slot) or '-1')
  if c < 0 then return nil end
  local released = math.floor(c * released_ppm / 1000000)
  return released - tonumber(redis.call('HGET', taken, slot) or '0')
end

-- Keyed permutation of [0, 10^8): a balanced Feistel network on two 4-digit halves whose
-- round function is a keyed hash (SHA-1), so that neighbours in the sequence give
-- unrelated codes. Sequence numbers are unique across releases (blocks from
-- PostgreSQL), so are codes. release_service/scripts/booking_codes.py is the same in Python.
-- Each round hashes "key:round:half"; the "key:round:" prefixes are made once per call
-- (a string.format per round cost a fifth of the code's time).
local round_prefix = {}
for r, key in ipairs({k1, k2, k3, k4, k1 + k3, k2 + k4}) do
  round_prefix[r] = string.format('%d:%d:', key, r)
end
local function code_for(seq)
  local hi, lo = math.floor(seq / 10000), seq % 10000
  for r = 1, 6 do
    local digest = redis.sha1hex(round_prefix[r] .. lo)
    local f = tonumber(string.sub(digest, 1, 8), 16) % 10000
    hi, lo = lo, (hi + f) % 10000
  end
  return string.format('%08d', hi * 10000 + lo)
end

-- Fixed-window counters, as lua/rate_limit.lua: spend every one, then refuse with the
-- wait of the first that is over its limit.
local function over_limit(spec)
  local refused, i = nil, 0
  for index, limit, window in string.gmatch(spec, '(%d+),(%d+),(%d+)') do
    i = i + 1
    local key = KEYS[tonumber(index)]
    local count = redis.call('INCR', key)
    if count == 1 then redis.call('PEXPIRE', key, window) end
    if count > tonumber(limit) and not refused then
      local wait = redis.call('PTTL', key)
      if wait < 0 then redis.call('PEXPIRE', key, window); wait = tonumber(window) end
      refused = wait .. ',' .. i
    end
  end
  return refused
end

-- Every check of a claim, then (all passed) every write of it.
local function decide(claim_id, account_id, person_id, slot, ikey, birth, sex, day, mode,
                      request_id, decline_ms)
  local standby = mode == 'standby'
  local visit_day  -- of the slot, once read
  local idem_field = account_id .. ':' .. ikey
  if mode == 'draw' then
    if state == 'closed' or state == 'paused' then return state, '' end  -- by an operator
  elseif window ~= 'open' and not standby then
    return window, window_arg
  end
  local held = redis.call('HGET', holders, person_id)
  if held then return 'already_claimed', redis.call('HGET', claims, held) end
  if need_sex ~= '' and sex ~= need_sex then return 'not_eligible', 'sex' end

  if standby then
    if tonumber(redis.call('HGET', meta, 'held:' .. slot) or '0') <= 0 then
      return 'sold_out', ''
    end
  elseif slot ~= '' then
    local left = available(slot)
    if left == nil then return 'unknown_slot', '' end
    if left <= 0 then return 'sold_out', next_wave end
  else
    local other = ''
    for s in string.gmatch(m[8], '[^,]+') do
      if available(s) > 0 then
        if day == '' then slot = s; break end
        local d = redis.call('HGET', slotday, s)
        if d == day then slot, visit_day = s, d; break end
        if other == '' then other = d end
      end
    end
    -- The gateway picked the day from its view of the stock, which lags: a day with
    -- stock left is named (the person's reservation moves there), not a sell-out.
    if slot == '' and other ~= '' then return 'day_full', other end
    if slot == '' then return 'sold_out', next_wave end
  end

  -- Age in whole years on the visit day: YYYYMMDD arithmetic does it exactly.
  visit_day = tonumber(visit_day or redis.call('HGET', slotday, slot))
  local age = math.floor((visit_day - tonumber(birth)) / 10000)
  if (min_age >= 0 and age < min_age) or (max_age >= 0 and age > max_age) then
    return 'not_eligible', 'age'
  end

  local seq_range = redis.call('HMGET', meta, 'code_next', 'code_end')
  local seq = tonumber(seq_range[1])
  if seq >= tonumber(seq_range[2]) then return 'codes_exhausted', '' end

  -- All checks passed: write everything.
  local code = code_for(seq)
  local record = {
    claim_id = claim_id, code = code, release_id = release_id, slot_id = slot,
    person_id = person_id, account_id = account_id, status = 'confirmed',
    claimed_at_ms = now, request_id = request_id,
  }
  redis.call('HINCRBY', meta, 'code_next', 1)
  if standby then
    -- The held slot never went back on sale: it stays taken, the hold is used up.
    record.via, record.decline_until_ms = 'standby', now + tonumber(decline_ms)
    redis.call('HINCRBY', meta, 'held:' .. slot, -1)
  else
    redis.call('HINCRBY', meta, 'left', -1)
    redis.call('HINCRBY', taken, slot, 1)
  end
  local claim = cjson.encode(record)
  redis.call('HSET', claims, claim_id, claim)
  redis.call('HSET', holders, person_id, claim_id)
  redis.call('HSET', codes, code, claim_id)
  if ikey ~= '' then redis.call('HSET', idem, idem_field, claim_id) end
  redis.call('XADD', outbox, '*', 'type', 'claim.confirmed', 'e', claim)
  return 'ok', claim
end

-- Queue mode: why the person's admission cannot be used now (nil: it can). The
-- admission is checked and spent in this script, with the claim, so that no claim goes
-- without one and no admission is spent by a claim that never ran.
local function admission_refused(person_id, jti)
  if jti == '' then return 'missing' end
  local holder = redis.call('HGET', q_jtis, jti)
  if holder == 'u:' .. person_id then return 'used' end
  if holder == 'x:' .. person_id then return 'expired' end
  if holder ~= person_id then return 'invalid' end
  local prefix = 'a:' .. jti .. ':'
  local w = redis.call('HGET', q_who, person_id) or ''
  if string.sub(w, 1, #prefix) ~= prefix then return 'invalid' end
  if tonumber(string.sub(w, #prefix + 1)) <= now then return 'expired' end
  return nil
end

-- An admission is spent by a claim that won, and by a refusal no retry can change
-- (the person holds a claim, is not eligible, or the release is closed or sold out);
-- a refusal that may pass (a full slot with stock elsewhere, a pause, a rate limit)
-- leaves it to the person until it expires.
local function spends_admission(status)
  if status == 'ok' or status == 'already_claimed' or status == 'not_eligible'
      or status == 'closed' then
    return true
  end
  return status == 'sold_out' and tonumber(redis.call('HGET', meta, 'left')) <= 0
end

local function claim_one(claim_id, account_id, person_id, slot, ikey, birth, sex, day, mode,
                         request_id, limits, decline_ms, jti)
  local idem_field = account_id .. ':' .. ikey
  if ikey ~= '' then
    local earlier = redis.call('HGET', idem, idem_field)
    if earlier then return 'replay', redis.call('HGET', claims, earlier) end
  end
  if mode == 'replay' then return 'no_replay', '' end
  local refused = over_limit(limits)
  if refused then return 'rate_limited', refused end
  if queued and mode == 'claim' then
    local why = admission_refused(person_id, jti)
    local held = why and redis.call('HGET', holders, person_id)
    if held then return 'already_claimed', redis.call('HGET', claims, held) end  -- as ever
    if why then return 'admission', why end
    local status, payload = decide(claim_id, account_id, person_id, slot, ikey, birth, sex,
      day, mode, request_id, decline_ms)
    if spends_admission(status) then
      redis.call('HSET', q_jtis, jti, 'u:' .. person_id)
      redis.call('HSET', q_who, person_id, 'u')
      redis.call('ZREM', q_live, jti)
    end
    return status, payload
  end
  return decide(claim_id, account_id, person_id, slot, ikey, birth, sex, day, mode,
    request_id, decline_ms)
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

for i = 0, n - 1 do
  local f = fields(ARGV[7 + i])
  local status, payload = claim_one(f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9],
    f[10] or '', f[11] or '', f[12] or '', f[13] or '')
  reply[#reply + 1] = status
  reply[#reply + 1] = payload
end
return reply
