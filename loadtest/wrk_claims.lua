-- wrk script: POST claims, each request as another resident; prints a JSON summary.
-- Environment: CLAIMS_FILE (lines "token person_id"), CLAIM_PATH (/v1/releases/R/claims),
-- WRK_THREADS (the -t given to wrk: each thread takes its own share of the residents).
local lines, index, count = {}, 0, 0
local path = os.getenv("CLAIM_PATH") or "/"
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  local file = os.getenv("CLAIMS_FILE")
  local threads = tonumber(os.getenv("WRK_THREADS") or "1")
  if file then
    local n = 0
    for line in io.lines(file) do
      if n % threads == id then
        local token, person = line:match("^(%S+) (%S+)$")
        lines[#lines + 1] = {token, person}
      end
      n = n + 1
    end
  end
  count = #lines
end

function request()
  if count == 0 then
    return wrk.format("POST", path, {["Content-Type"] = "application/json"}, "{}")
  end
  index = index % count + 1
  local r = lines[index]
  return wrk.format("POST", path, {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. r[1]}, '{"person_id":"' .. r[2] .. '"}')
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx_or_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
