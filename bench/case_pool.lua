-- bench/case_pool.lua: the process pool case of bench/bench.lua, which loads every
-- bench/case_*.lua with B (its helpers and B.quick) and registers what
-- it declares with B.case.

local B = ...
local H = B.H
local prefork = require "prefork"
local quick = B.quick

B.case{name = "pool", title = "pool: trivial job (return x), 2 workers, one call per message, 200k calls queued at once",
  unit = "calls/s", better = "higher", target = {min = 150000},
  note = "lua-prefork's `load` is the calls in flight per worker; Python's "
    .. "multiprocessing.Pool.map(chunksize=1) has no such bound (its feeder thread "
    .. "queues every task), so the comparable figure is lua-prefork with load = 64; "
    .. "the default load = 2 is shown beside it. AnyEvent::Fork::Pool is not in "
    .. "Debian: its 35k calls/s is the figure of design.md.",
  run = function ()
    local n = quick and 50000 or 200000
    local cmds = {
      {"lua-prefork", ("%s bench/pool.lua calls %d 64"):format(H.lua, n)},
      {"lua-prefork, load = 2", ("%s bench/pool.lua calls %d 2"):format(H.lua, n)},
      {"python multiprocessing", ("python3 bench/peers/mp_pool.py calls %d"):format(n)},
    }
    local samples = {}
    for r = 1, B.rounds do
      for _, c in ipairs(cmds) do
        local p = H.spawn(c[2])
        p:wait(120)
        local v = tonumber(p:out():match("calls/s (%d+)"))
        if v then
          samples[c[1]] = samples[c[1]] or {}
          table.insert(samples[c[1]], v)
        end
        B.say(("  round %d %-24s %s"):format(r, c[1], v and ("%.0f calls/s"):format(v)
              or ("failed: " .. p:err())))
      end
    end
    return samples
  end}

