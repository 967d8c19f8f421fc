--[[ queue_join.lua (after queue_advance.lua): ARGV[1] person. One entry per person: a
second join answers the standing of the first.
Reply: `report` (queue_advance.lua; joined = 1 when new) | {"closed"} | {"sold_out"} |
{"too_early", when joining opens (ms)}, or the prologue's {"not_found"} | {"not_queue"}.]]
local person = ARGV[1]
if redis.call('HEXISTS', who, person) == 1 then return report(person, 0) end
if closed then return {'closed'} end
if left <= 0 then return {'sold_out'} end  -- told at once: nobody queues for stock gone
if now < join_ms then return {'too_early', join_ms} end
if shuffled then
  tail = tail + 1
  redis.call('RPUSH', line, person)
  redis.call('HSET', pos, person, tail)
  redis.call('HSET', meta, 'q_tail', tail)
else
  redis.call('RPUSH', pre, person)
end
redis.call('HSET', who, person, 'w')
admit()
return report(person, 1)
