--[[ queue_status.lua (after queue_advance.lua): ARGV[1] person ("" = only advance).
Reply: see `report`.]]
return report(ARGV[1], 0)
