--[[ eligibility.lua: prepended to the scripts that accept a person before any slot is
chosen (standby_join.lua, lottery_enter.lua). `ineligible` says why the person may not be
booked in the release ('sex' or 'age'; nil when they may): the sex the release requires,
and an age within its bounds (-1 = none) on at least one slot's visit day.
]]
local function ineligible(slotday, birth, sex, need_sex, min_age, max_age)
  if need_sex ~= '' and sex ~= need_sex then return 'sex' end
  local days = redis.call('HVALS', slotday)
  for i = 1, #days do
    local age = math.floor((tonumber(days[i]) - tonumber(birth)) / 10000)
    if (min_age < 0 or age >= min_age) and (max_age < 0 or age <= max_age) then return nil end
  end
  return 'age'
end
