--[[ queue_status.lua (after queue_advance.lua): ARGV[1] person ("" = only advance).
Reply: `report` (queue_advance.lua; joined 0; status "none" for "" or a person not in the
room), or the prologue's {"not_found"} | {"not_queue"}.]]
return report(ARGV[1], 0)
