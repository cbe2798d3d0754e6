-- Accept strategies: "shared" (one socket, EPOLLEXCLUSIVE wake-ups) and
-- "master" (the master accepts and hands each connection to the least
-- loaded worker). Load reaches every worker; a retired worker serves
-- what it was handed; the counters tell the balance.

local lu = require "luaunit"
local H = require "helpers"
local socket = require "socket"

-- a worker answers "<pid>" to each line; "spin" keeps its loop busy; the
-- arguments: the strategy and, maybe, the status endpoint
local SERVER = [[
local strategy, status = ...
prefork.start{workers = 2, listen = "127.0.0.1:0", accept = strategy,
  status = status, on_start = announce,
  on_reload = function (m)
    for _, w in ipairs(m:workers()) do
      print("STATS", w.id, w.accepted, w.inflight)
    end
    io.stdout:flush()
  end,
  fork = function (w)
    w:serve(function (c)
      for line in function () return c:read("l") end do
        if line == "spin" then
          local t = os.clock() + 0.02
          while os.clock() < t do end
        end
        c:write(prefork.getpid(), "\n")
      end
    end)
  end}
]]

local connect, count, spread = H.connect, H.count, H.ask

--- the pids that answered ({[answer] = times}), sorted
local function pidset (seen)
  local t = {}
  for pid in pairs(seen) do t[#t + 1] = tonumber(pid) end
  table.sort(t)
  return t
end

--- the sum of the values of a metric (a pattern) on the status socket
local function metric (sock, what)
  local n = 0
  local text = H.sh("curl -s --max-time 5 --unix-socket " .. sock .. " http://x/metrics")
  for v in text:gmatch("\n" .. what .. " (%d+)") do n = n + tonumber(v) end
  return n
end

--- under strategy, 20 connections at once that keep a worker busy reach
-- both workers (a busy worker is not waiting: the other gets the rest)
local function reaches_both (strategy)
  local p = H.server{code = SERVER, args = strategy}
  local seen = H.wait_until(function ()
    local s, cs = spread(p.port, 20, "spin")
    for _, c in ipairs(cs) do c:close() end
    return count(s) == 2 and s
  end, 10, "both workers to serve")
  lu.assertEquals(pidset(seen), p.pids)  -- the master's two workers
  return p
end

TestAccept = {}

function TestAccept:tearDown () H.cleanup() end


function TestAccept:test_shared_load_reaches_every_worker ()
  reaches_both("shared")
end


--- every pid is asleep (state "S")
local function asleep (pids)
  for _, k in ipairs(pids) do
    if H.pstate(k) ~= "S" then return false end
  end
  return true
end


--- n connections to p's idle workers, one after another, each answered
-- and kept open: {[pid] = connections it holds}, and them
local function held_one_by_one (p, n)
  local seen, cs = {}, {}
  for i = 1, n do
    cs[i] = connect(p.port)
    cs[i]:send("x\n")
    local pid = assert(cs[i]:receive("*l"))
    seen[pid] = (seen[pid] or 0) + 1
    -- the next arrives when every worker is back in its wait (with none
    -- busy, the kernel wakes the first sleeper in the listener's queue)
    H.wait_until(function () return asleep(p.pids) end, 5, "idle workers")
  end
  return seen, cs
end


-- Keep-alive connections stay where they land, and idle workers sleep in
-- the listener's queue in a fixed order, so without the balance the first
-- takes them all (nginx's "one worker gets everything")
function TestAccept:test_shared_serve_spreads_held_connections ()
  local p = H.server{code = SERVER, args = "shared"}
  local seen, cs = held_one_by_one(p, 20)
  lu.assertEquals(count(seen), 2, "one worker holds them all")
  for pid, n in pairs(seen) do  -- 10 each, give or take one and an eighth
    lu.assertTrue(n >= 8 and n <= 12, ("%s holds %d of 20"):format(pid, n))
  end
  p:kill("HUP")  -- the counters say the same
  p:expect("STATS\t2\t%d+\t%d+\n")
  for id = 1, 2 do
    local inflight = tonumber(p:out():match("STATS\t" .. id .. "\t%d+\t(%d+)"))
    lu.assertTrue(inflight >= 8 and inflight <= 12, "inflight " .. inflight)
  end
  for _, c in ipairs(cs) do c:close() end
end


function TestAccept:test_master_hands_to_the_least_loaded ()
  -- both ready: the master hands over only to ready workers
  local p = H.server{code = SERVER, args = "master"}
  local seen, cs = spread(p.port, 10, "x")  -- all 10 held open at once
  lu.assertEquals(count(seen), 2)
  for _, n in pairs(seen) do lu.assertEquals(n, 5) end  -- 5 and 5
  p:kill("HUP")  -- on_reload prints the counters
  p:expect("STATS\t2\t%d+\t%d+\n")
  local a1, i1 = p:out():match("STATS\t1\t(%d+)\t(%d+)")
  local a2, i2 = p:out():match("STATS\t2\t(%d+)\t(%d+)")
  lu.assertEquals({tonumber(a1), tonumber(i1), tonumber(a2), tonumber(i2)},
                  {5, 5, 5, 5})
  for _, c in ipairs(cs) do c:close() end
end


function TestAccept:test_master_a_retired_worker_serves_what_it_was_handed ()
  local sock = H.tmpname() .. ".sock"
  local p = H.server{code = SERVER, args = "master unix:" .. sock}
  local cs = {}
  for i = 1, 10 do cs[i] = connect(p.port) end  -- handed over, not asked yet
  H.wait_until(function ()
    return metric(sock, "prefork_worker_inflight{[^}]*}") == 10
  end, 5, "10 connections handed over")
  p:kill("TTOU")  -- worker 2 goes; its connections are still answered
  H.wait_until(function ()
    return metric(sock, 'prefork_workers{state="stopping"}') == 1
  end, 5, "a worker stopping")
  local seen = {}
  for i = 1, 10 do
    cs[i]:send("x\n")
    local pid = cs[i]:receive("*l")
    lu.assertNotNil(pid, "connection " .. i .. " lost")
    seen[pid] = true
    cs[i]:close()
  end
  lu.assertEquals(count(seen), 2)
  H.nworkers(p, 1)
  -- new connections now all go to the one left
  local after = spread(p.port, 6, "x")
  lu.assertEquals(count(after), 1)
end


function TestAccept:test_master_a_killed_worker_costs_only_its_own ()
  local p = H.server{code = SERVER, args = "master"}
  local pids = p.pids
  local cs = {}
  for i = 1, 10 do
    cs[i] = connect(p.port)
    cs[i]:send("x\n")
  end
  local owner = {}
  for i = 1, 10 do owner[i] = tonumber(cs[i]:receive("*l")) end
  H.kill(pids[1], "KILL")
  H.nworkers(p, 2)
  local served = 0
  for i = 1, 10 do
    if owner[i] ~= pids[1] then  -- the survivor's connections go on
      cs[i]:send("y\n")
      lu.assertEquals(tonumber(cs[i]:receive("*l")), owner[i])
      served = served + 1
    end
    cs[i]:close()
  end
  lu.assertEquals(served, 5)
  -- and the replacement, once ready, takes its share of new connections
  H.ready(p, 2)
  lu.assertEquals(count(spread(p.port, 10, "x")), 2)
end


local function listening (port)  -- LISTEN sockets on the port
  local n = 0
  for _ in H.sh("ss -ltnH 'sport = :" .. port .. "'"):gmatch("LISTEN") do n = n + 1 end
  return n
end


function TestAccept:test_reuseport_one_socket_per_worker_and_load_reaches_all ()
  local p = reaches_both("reuseport")
  lu.assertEquals(listening(p.port), 2)  -- the master's template does not listen
end


function TestAccept:test_reuseport_a_killed_workers_queue_goes_to_its_replacement ()
  -- ready: a KILL is no crash, the respawn is at once
  local p = H.server{code = SERVER, args = "reuseport"}
  local pids = p.pids
  H.kill(pids[1], "KILL")
  local cs = {}
  for i = 1, 20 do  -- some land on the dead worker's socket, in its queue
    cs[i] = connect(p.port)
    cs[i]:send("x\n")
  end
  local seen = {}
  for i = 1, 20 do
    local pid = cs[i]:receive("*l")
    lu.assertNotNil(pid, "connection " .. i .. " lost")
    seen[tonumber(pid)] = true
    cs[i]:close()
  end
  lu.assertNil(seen[pids[1]])
  lu.assertEquals(count(seen), 2)  -- the replacement served its queue
end


function TestAccept:test_reuseport_a_removed_id_takes_its_socket_along ()
  local p = H.server{code = SERVER, args = "reuseport"}
  p:kill("TTOU")
  H.nworkers(p, 1)
  H.wait_until(function () return listening(p.port) == 1 end, 5, "one socket")
  local seen, cs = spread(p.port, 20, "x")  -- none is lost or refused
  lu.assertEquals(count(seen), 1)
  for _, c in ipairs(cs) do c:close() end
  p:kill("TTIN")
  H.nworkers(p, 2)
  H.wait_until(function () return listening(p.port) == 2 end, 5, "two sockets")
end


--- 10 connections, one after another, to p's 4 idle workers that answer
-- "x": about one wake-up each (a herd would wake all 4: 40)
local function assert_one_wakeup (p)
  local kids = H.nworkers(p, 4)
  lu.assertEquals(H.request_ok(p.port), "x")
  local function idle () return asleep(kids) end  -- every worker in its wait
  H.wait_until(idle, 5, "4 idle workers")
  local function switches ()
    local n = 0
    for _, k in ipairs(kids) do
      local s = H.readfile("/proc/" .. k .. "/status") or ""
      n = n + tonumber(s:match("\nvoluntary_ctxt_switches:%s*(%d+)") or 0)
    end
    return n
  end
  local before = switches()
  for _ = 1, 10 do lu.assertEquals(H.request(p.port), "x") end
  H.wait_until(idle, 5, "4 idle workers")
  lu.assertTrue(switches() - before <= 20, "wake-ups: " .. switches() - before)
end


function TestAccept:test_shared_blocking_accept_wakes_one_worker ()
  local p = H.server{workers = 4, handler = 'c:write("x") c:close()'}
  assert_one_wakeup(p)
end


function TestAccept:test_shared_serve_wakes_one_worker ()
  local p = H.server{workers = 4, serve = true, handler = 'c:write("x") c:close()'}
  assert_one_wakeup(p)
end


function TestAccept:test_mutex_serve_load_reaches_every_worker ()
  reaches_both("mutex")
end


-- the seed's shape: blocking workers, one connection at a time, accept
-- under a lock in a private directory
function TestAccept:test_mutex_blocking_workers_take_turns ()
  local p = H.server{workers = 3, accept = "mutex", handler = [[
      c:read("l")
      c:write(prefork.getpid(), "\n")
      c:close()]]}
  local seen = H.wait_until(function ()
    local s, cs = spread(p.port, 3, "x")  -- 3 held at once: 3 workers
    for _, c in ipairs(cs) do c:close() end
    return count(s) == 3 and s
  end, 10, "3 workers to serve")
  lu.assertEquals(pidset(seen), p.pids)  -- the master's three workers
  -- the lock is an open file that no path reaches: nobody else can make,
  -- swap or find it, and nothing is left behind
  local locks = {}
  for _, pid in ipairs(H.childpids(p.pid)) do
    for t in pairs(H.fdtargets(pid)) do
      if t:find("accept.lock", 1, true) then locks[#locks + 1] = t end
    end
  end
  lu.assertEquals(#locks, 3)
  for _, t in ipairs(locks) do
    lu.assertStrMatches(t, ".*/prefork%-%w+/accept%.lock %(deleted%)")
  end
  p:kill("TERM")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end


function TestAccept:test_unknown_strategy_is_refused ()
  local ok, err = pcall(require("prefork").start,
                        {accept = "magic", fork = function () end})
  lu.assertFalse(ok)
  lu.assertStrContains(err, [[accept must be "shared", "reuseport", "mutex" or "master"]])
end


os.exit(lu.LuaUnit.run())
