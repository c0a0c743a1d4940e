-- wrk script for benchmarks/serving.py: POST /invocations, cycling through the JSON bodies of the
-- file named by the environment variable BODIES (one per line); prints one JSON summary line.
local bodies = {}
local i = 0

function init(args)
  local f = assert(io.open(os.getenv("BODIES"), "rb"))
  for line in f:lines() do
    bodies[#bodies + 1] = line
  end
  f:close()
end

local headers = {["Content-Type"] = "application/json"}
if os.getenv("CONN_CLOSE") == "1" then
  headers["Connection"] = "close"  -- a new TCP connection per request
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/invocations", headers, bodies[i])
end

function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"duration_s\": %.3f, \"p50_ms\": %.2f, \"p90_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f, \"non2xx\": %d, \"errors_timeout\": %d, \"errors_other\": %d}\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, summary.errors.status,
    summary.errors.timeout, summary.errors.connect + summary.errors.read + summary.errors.write))
end
