-- wrk script: POST one JSON-RPC request per call with the MCP headers, count JSON-RPC errors.
-- The runner passes the body in BENCH_BODY and the headers, one "name: value" per line, in
-- BENCH_HEADERS. A response that is not HTTP 200 or carries "error" counts as an error.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  failures = 0
  samples = ""
end

function response(status, headers, body)
  if status ~= 200 or string.find(body, '"error"', 1, true) then
    failures = failures + 1
    if string.len(samples) < 300 then samples = samples .. status .. " " .. string.sub(body, 1, 200) .. "\n" end
  end
end

function done(summary, latency, requests)
  local total = 0
  local sample = ""
  for _, thread in ipairs(threads) do
    total = total + thread:get("failures")
    sample = sample .. (thread:get("samples") or "")
  end
  io.write(string.format("BENCH {\"requests\": %d, \"seconds\": %.3f, \"errors\": %d, \"socket_errors\": %d, " ..
    "\"p50_ms\": %.3f, \"p99_ms\": %.3f}\n",
    summary.requests, summary.duration / 1e6, total,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  if total > 0 then io.write("BENCH-ERRORS " .. sample .. "\n") end
end
