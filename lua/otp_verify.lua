--[[ otp_verify.lua: check a one-time login code; single use, 5 wrong tries burn it.

KEYS: 1 otp  hash {digest, tries} with the code's lifetime as TTL (tag {phone})
ARGV: 1 digest of the code the caller typed, 2 tries allowed (5)
Reply: "ok" (and the code is gone) | "wrong" | "burned" (too many tries: gone) | "missing"
]]
local digest = redis.call('HGET', KEYS[1], 'digest')
if not digest then return 'missing' end
if digest == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 'ok'
end
local tries = redis.call('HINCRBY', KEYS[1], 'tries', 1)
if tries >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return 'burned'
end
return 'wrong'
