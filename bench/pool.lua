-- bench/pool.lua N LOAD: N calls of a trivial job (function (x) return x end)
-- on a pool of exactly 2 workers, one call per pool:call, all queued at
-- once; prints "calls/s <figure>".
local prefork = require "prefork"
local now = require("prefork.core").now
local n, load = tonumber(arg[1]) or 200000, tonumber(arg[2]) or 2
local pool = prefork.pool{function (x) return x end, min = 2, max = 2, load = load}
pool:map{1, 2, 3, 4}  -- both workers up
local got = 0
local function cb (ok) if ok then got = got + 1 end end
local t0 = now()
for i = 1, n do pool:call(i, cb) end
pool:wait()
local dt = now() - t0
assert(got == n, "lost calls")
print(("calls/s %.0f"):format(n / dt))
pool:close()
