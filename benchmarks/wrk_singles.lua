-- wrk script for benchmarks/server_ingest.py --client wrk: single CloudEvents, one per
-- POST /api/v1/events (application/cloudevents+json), each with its own id so nothing is
-- deduplicated downstream.
--
--   wrk -t1 -c32 -d120s --timeout 30s -s benchmarks/wrk_singles.lua URL -- KEY QUOTA NONCE
--
-- wrk runs for a duration, not a count, and drops the requests in flight when it stops,
-- which the server may still accept; so that the harness can check that the server
-- accepted exactly as many events as wrk saw 204s, each thread sends QUOTA posts, then only
-- GET /healthz (no event, answers 200), and once all of its posts are answered prints
-- "thread-done" and stops its loop. The harness interrupts wrk (SIGINT) when every
-- thread is done; done() prints one JSON line with the counts and the latencies.
-- (The latency histogram also holds the few /healthz requests of the last milliseconds,
-- at most one per connection per round trip after its thread's quota.)

local threads = {}
local next_id = 1

function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   key, quota, nonce = args[1], tonumber(args[2]), args[3]
   -- globals, read by done() through thread:get
   sent, ok, health, other, codes = 0, 0, 0, 0, ""
   finished = false
   -- wrk calls request() once on the first thread's state before the run, to check the
   -- request parses, and never sends that one: it must not use up an id or the quota.
   probed = (tid ~= 1)
   headers = {["Authorization"] = "Bearer " .. key,
              ["Content-Type"] = "application/cloudevents+json"}
   healthz = wrk.format("GET", "/healthz")
end

function request()
   if not probed then
      probed = true
      return healthz
   end
   if sent >= quota then
      return healthz
   end
   sent = sent + 1
   local body = string.format(
      '{"specversion":"1.0","id":"%s-%d-%d","source":"bench","type":"api_calls",' ..
      '"subject":"cust-%d"}', nonce, tid, sent, sent % 1000)
   return wrk.format("POST", "/api/v1/events", headers, body)
end

function response(status, headers, body)
   if status == 204 then
      ok = ok + 1
   elseif status == 200 then
      health = health + 1  -- only /healthz answers 200 here (a single CloudEvent: 204)
   else
      other = other + 1
      codes = codes .. status .. " "
   end
   if not finished and ok + other >= quota then
      finished = true
      io.write("thread-done\n")
      io.flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local t = {sent = 0, ok = 0, health = 0, other = 0}
   local codes_all = ""
   for _, thread in ipairs(threads) do
      for k, _ in pairs(t) do
         t[k] = t[k] + thread:get(k)
      end
      codes_all = codes_all .. thread:get("codes")
   end
   local e = summary.errors
   io.write(string.format(
      '{"sent":%d,"ok":%d,"health":%d,"other":%d,"codes":"%s","duration_us":%d,' ..
      '"requests":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"connect_errors":%d,' ..
      '"read_errors":%d,"write_errors":%d,"timeouts":%d,"status_errors":%d}\n',
      t.sent, t.ok, t.health, t.other, codes_all, summary.duration, summary.requests,
      latency:percentile(50), latency:percentile(99), latency.max, e.connect, e.read,
      e.write, e.timeout, e.status))
end
