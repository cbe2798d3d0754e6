-- bench/pool.lua MODE N [ARG]: the pool's throughput on a pool of exactly
-- 2 workers (up before the clock starts); prints "<unit> <figure>".
--   calls N [LOAD]      N pool:call of a trivial job (return x), all queued
--                       at once, default options (or load = LOAD): calls/s
--   map N [CHUNKSIZE]   pool:map of that job over 1..N (default chunking,
--                       or chunksize = CHUNKSIZE): items/s
--   kb N [CHUNKSIZE]    pool:map of the trivial job over N strings of 1 KB:
--                       items/s
--   mix SECONDS [LOAD]  open loop for SECONDS: 10 fast calls (return x) a
--                       millisecond and a slow one (10 ms) every 20 ms;
--                       prints the fast calls' latency, "p50 <ms> p99 <ms>
--                       within1ms <% of them answered within 1 ms>"
local prefork = require "prefork"
local now = require("prefork.core").now
local mode, n, extra = arg[1], tonumber(arg[2]) or 200000, tonumber(arg[3])

local job = function (x) return x end
if mode == "mix" then
  job = function (x) if x == "slow" then prefork.sleep(0.01) end return x end
end
local opts = {job, min = 2, max = 2}
if mode == "calls" or mode == "mix" then opts.load = extra end
local pool = prefork.pool(opts)
local list = {}
if mode == "kb" then
  local base = ("abcdefghijklmnop"):rep(64)  -- 1024 bytes
  for i = 1, n do list[i] = base:sub(1, 1000) .. ("%024d"):format(i) end
else
  for i = 1, n do list[i] = i end
end
pool:map({list[1], list[2], list[3], list[4]}, {chunksize = 1})  -- both workers up

local t0, dt = now(), nil
if mode == "mix" then
  local lat, sent = {}, 0
  local function fast (t)
    return function () lat[#lat + 1] = now() - t end
  end
  local stop, nextslow = t0 + n, t0
  while now() < stop do
    local t = now()
    for _ = sent, math.floor((t - t0) * 10000) do  -- 10 a millisecond
      pool:call(t, fast(t))
      sent = sent + 1
    end
    if t >= nextslow then
      pool:call("slow", function () end)
      nextslow = nextslow + 0.02
    end
    pool:poll(0.0005)
  end
  pool:wait()
  table.sort(lat)
  local within = 0
  for _, l in ipairs(lat) do if l <= 0.001 then within = within + 1 end end
  print(("p50 %.3f p99 %.3f within1ms %.2f"):format(lat[#lat // 2] * 1e3,
    lat[#lat * 99 // 100] * 1e3, 100 * within / #lat))
elseif mode == "calls" then
  local got = 0
  local function cb (ok) if ok then got = got + 1 end end
  for i = 1, n do pool:call(i, cb) end
  pool:wait()
  dt = now() - t0
  assert(got == n, "lost calls")
  print(("calls/s %.0f"):format(n / dt))
else
  local res = pool:map(list, {chunksize = extra})
  dt = now() - t0
  assert(#res == n and res[n] == job(list[n]), "wrong results")
  print(("items/s %.0f"):format(n / dt))
end
pool:close()
