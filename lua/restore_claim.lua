--[[ restore_claim.lua: write back claims that PostgreSQL holds as bookings but Redis lost.

Redis can come back without its last writes (appendfsync everysec and an operating-system
crash: up to a second of claims). A lost claim whose booking was already persisted must
hold its slot again, or the slot would be sold a second time, and its code sequence must
stay used, or a new claim would get the same code.

KEYS (all under the release's hash tag {R}, so one Redis Cluster slot):
  1 meta      hash  ... left code_next code_end
  2 cap       hash  slot_id -> capacity
  3 taken     hash  slot_id -> active claims
  4 holders   hash  person_id -> claim_id
  5 claims    hash  claim_id -> claim JSON
  6 codes     hash  code -> claim_id
  7..9 q_who, q_live, q_jtis   the waiting room of a queue release (lua/queue_advance.lua;
                               absent otherwise): a restored holder's admission, replayed
                               from before the loss, is marked used, so it does not hold
                               room until it expires

ARGV:
  1 n, the number of claims
  then two values per claim: the claim JSON (as claim.lua writes it, status confirmed)
  and the sequence number its code was made from

Reply: one status per claim, in order:
  "present"         Redis holds the claim: nothing done
  "restored"        written back: slot taken, holder, claim, code; code_next past its seq
  "over_capacity"   written back, but the slot now counts more claims than its capacity:
                    it was sold again between the restart and this repair
  "person_twice"    written back, but the person holds another claim in this release
                    (claimed again between the restart and this repair); holder kept

Guarantees: idempotent (a present claim is never counted twice); no outbox event (the
booking is persisted already); every write of one claim happens together.
]]

local meta, cap, taken, holders, claims, codes, q_who, q_live, q_jtis =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local n = tonumber(ARGV[1])
local reply = {}

for i = 0, n - 1 do
  local raw, seq = ARGV[2 + 2 * i], tonumber(ARGV[3 + 2 * i])
  local claim = cjson.decode(raw)
  if redis.call('HEXISTS', claims, claim.claim_id) == 1 then
    reply[#reply + 1] = 'present'
  else
    local status = 'restored'
    local now_taken = redis.call('HINCRBY', taken, claim.slot_id, 1)
    if now_taken > tonumber(redis.call('HGET', cap, claim.slot_id) or '0') then
      status = 'over_capacity'
    end
    redis.call('HINCRBY', meta, 'left', -1)
    local range = redis.call('HMGET', meta, 'code_next', 'code_end')
    if tonumber(range[1]) <= seq and seq < tonumber(range[2]) then
      redis.call('HSET', meta, 'code_next', seq + 1)
    end
    redis.call('HSET', claims, claim.claim_id, raw)
    redis.call('HSET', codes, claim.code, claim.claim_id)
    if redis.call('HSETNX', holders, claim.person_id, claim.claim_id) == 0
        and status == 'restored' then
      status = 'person_twice'
    end
    local jti = string.match(redis.call('HGET', q_who, claim.person_id) or '', '^a:([^:]+):')
    if jti then
      redis.call('HSET', q_jtis, jti, 'u:' .. claim.person_id)
      redis.call('ZREM', q_live, jti)
      redis.call('HSET', q_who, claim.person_id, 'u')
    end
    reply[#reply + 1] = status
  end
end
return reply
