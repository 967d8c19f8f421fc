--[[ claim_status.lua: move a claim from one status to another (check-in, no-show).

KEYS: 1 claims hash (release's tag)
ARGV: 1 claim_id, 2 expected status, 3 new status
Reply: "ok" | "missing" | the current status when it is not the expected one
]]
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'missing' end
local claim = cjson.decode(raw)
if claim.status ~= ARGV[2] then return claim.status end
claim.status = ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(claim))
return 'ok'
