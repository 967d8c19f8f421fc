--[[ queue_use.lua (after queue_advance.lua): ARGV[1] person, ARGV[2] jti. Spends the
person's admission before the claim: single use, only by its person, only before it
expires. The admission stays in `live` until queue_finish (or its expiry), so stock a
claim in flight is about to take is not offered to anyone else meanwhile.
Reply: {status, admitted, returned}: status ok | used | expired | invalid, then what the
prologue's advance did.]]
local person, jti = ARGV[1], ARGV[2]
local holder = redis.call('HGET', jtis, jti)
if holder == nil or holder == false then return {'invalid', admitted, returned} end
if holder == 'u:' .. person then return {'used', admitted, returned} end
if holder == 'x:' .. person then return {'expired', admitted, returned} end
if holder ~= person then return {'invalid', admitted, returned} end
local w = redis.call('HGET', who, person) or ''
local expires = tonumber(string.match(w, '^a:' .. jti .. ':(%d+)$') or '0')
if expires <= now then return {'expired', admitted, returned} end
redis.call('HSET', jtis, jti, 'u:' .. person)
redis.call('HSET', who, person, 'u')
return {'ok', admitted, returned}
