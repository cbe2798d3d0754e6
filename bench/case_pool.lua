-- bench/case_pool.lua: the process pool cases of bench/bench.lua, which
-- loads every bench/case_*.lua with B (its helpers and B.quick) and
-- registers what it declares with B.case. Each case runs bench/pool.lua
-- (2 workers, up before the clock starts) beside Python's
-- multiprocessing.Pool(2) (bench/peers/mp_pool.py) with the same job,
-- alternating, B.rounds times.

local B = ...
local H = B.H
local quick = B.quick
local PY = "python multiprocessing"

--- Run each {peer, command} B.rounds times, alternating; the figure is
-- the first capture of pattern in the output. {peer = {samples}}
local function rounds (cmds, pattern, unit)
  local samples = {}
  for r = 1, B.rounds do
    for _, c in ipairs(cmds) do
      local p = H.spawn(c[2])
      p:wait(300)
      local v = tonumber(p:out():match(pattern))
      if v then
        samples[c[1]] = samples[c[1]] or {}
        table.insert(samples[c[1]], v)
      end
      B.say(("  round %d %-28s %s"):format(r, c[1], v and ("%.0f %s"):format(v, unit)
            or ("failed: " .. p:err())))
      if c[3] then B.say("    " .. p:out():gsub("\n", " ")) end
    end
  end
  return samples
end

local function lua (args) return ("%s bench/pool.lua %s"):format(H.lua, args) end
local function py (args) return "python3 bench/peers/mp_pool.py " .. args end

--- A case of lua-prefork's map against Python's, `args` for both.
local function mapcase (name, title, ratio, args, note)
  B.case{name = name, title = title, unit = "items/s", better = "higher",
    target = {peer = PY, ratio = ratio}, note = note,
    run = function ()
      return rounds({{"lua-prefork", lua(args)}, {PY, py(args)}}, "items/s (%d+)", "items/s")
    end}
end

local N = quick and 50000 or 200000
mapcase("pool_map", ("pool:map of %d trivial items (return x), 2 workers, default options")
  :format(N), 1.5, "map " .. N,
  "Python: Pool(2).map with its default chunksize (4 chunks a worker); "
  .. "lua-prefork: pool:map(list) with its default chunking (4 chunks a worker, "
  .. "about 256 KB at most).")

local N1 = quick and 10000 or 50000
mapcase("pool_map1", ("pool:map of %d trivial items, chunksize = 1 (one item a message), "
  .. "2 workers"):format(N1), 1.0, "map " .. N1 .. " 1")

local NK = quick and 20000 or 100000
mapcase("pool_kb", ("pool:map of the trivial job over %d strings of 1 KB, 2 workers, "
  .. "default options"):format(NK), 1.0, "kb " .. NK,
  "The same map with a payload: 1 KB each way per item. lua-prefork's "
  .. "automatic chunks also stop at about 256 KB, so a chunk of large items "
  .. "stays in the caches.")

B.case{name = "pool", title = ("pool: %d single calls of a trivial job (return x), 2 workers, "
  .. "all queued at once, default options"):format(N),
  unit = "calls/s", better = "higher", target = {min = 150000},
  note = "lua-prefork: pool:call(i, cb) N times, then pool:wait(), at the default "
    .. "load (32 calls in flight per worker at most); load = 2 (the old default) "
    .. "beside it. Python: Pool(2).map(chunksize=1), one task a message. "
    .. "AnyEvent::Fork::Pool is not in Debian: its 35k calls/s is the figure of design.md.",
  run = function ()
    return rounds({{"lua-prefork", lua("calls " .. N)},
                   {"lua-prefork, load = 2", lua("calls " .. N .. " 2")},
                   {PY, py("calls " .. N)}}, "calls/s (%d+)", "calls/s")
  end}

local S = quick and 1 or 3
B.case{name = "pool_mix", title = ("pool: fast calls among slow ones (10 ms), open loop for %d s, "
  .. "2 workers: fast calls answered within 1 ms"):format(S),
  unit = "%", better = "higher", target = {peer = "load = 2 (the old default)", ratio = 0.99},
  note = "10 fast calls (return x) a millisecond and one slow call (10 ms) every "
    .. "20 ms, issued as they fall due; the figure is the share of fast calls "
    .. "answered within 1 ms of their call (the p50 and p99 latencies are in the "
    .. "log). It shows that the default load of 32 keeps fast calls from queueing "
    .. "behind slow ones as load = 2 did.",
  run = function ()
    return rounds({{"lua-prefork", lua("mix " .. S), true},
                   {"load = 2 (the old default)", lua("mix " .. S .. " 2"), true}},
                  "within1ms ([%d.]+)", "%")
  end}
