-- opts.standby: a worker forked ahead takes a dead worker's place (its
-- id, its context, the set's code as it is now), is renewed when the set
-- changes, replaced when it dies, and goes with the master.

local lu = require "luaunit"
local H = require "helpers"

TestStandby = {}

function TestStandby:tearDown () H.cleanup() end


-- a master whose workers answer each line with "<id> <pid> <gen>" (gen:
-- the config's, which each reload renews); after_fork prints where it ran
local function master (options)
  return H.master(([[
local gen = 0
prefork.start{workers = 2, listen = "127.0.0.1:0", on_start = announce, %s
  update = function () gen = gen + 1 return {gen = gen} end,
  after_fork = function (w)
    print("AFTER", w.id, prefork.getpid(), w.config.gen)
    io.stdout:flush()
  end,
  on_worker_exit = function (m, info)
    print("EXIT", info.id, info.pid)
    io.stdout:flush()
  end,
  fork = function (w)
    w:serve(function (c)
      while c:read("l") do
        c:write(("%%s %%d %%d\n"):format(w.id, prefork.getpid(), w.config.gen))
      end
    end)
  end}
]]):format(options or "standby = true,"))
end


-- the pid of the n-th standby that the log (p's stderr, or the text that
-- log() returns) says was forked; once it said it is ready, unless forked
local function standby (p, n, forked, log)
  local pids = {}
  log = log or function () return p:err() end
  H.wait_until(function ()
    pids = {}
    for pid in log():gmatch("standby %(pid (%d+)%) forked") do
      pids[#pids + 1] = tonumber(pid)
    end
    return #pids >= n
  end, 10, "standby number " .. n)
  if not forked then
    H.wait_until(function ()
      return log():find("standby (pid " .. pids[n] .. ") ready to take a place", 1, true)
    end, 30, "standby " .. pids[n] .. " ready")
  end
  return pids[n]
end


-- "<id> <pid> <gen>" from a worker, over one connection
local function ask (port)
  local c = H.connect(port, 5)
  c:send("who\n")
  local line = c:receive("*l")
  c:close()
  local id, pid, gen = line:match("^(%d+) (%d+) (%d+)$")
  return tonumber(id), tonumber(pid), tonumber(gen)
end


-- wait until the master says that the worker id in pid is ready (it
-- accepts); with after_fork's line from pid: its config's gen
local function ready (p, id, pid)
  p:expect(("worker %d %%(pid %d%%) ready"):format(id, pid), 10, "err")
  return tonumber(p:expect(("AFTER\t%d\t%d\t(%%d+)\n"):format(id, pid), 10))
end


-- the pid of the latest process of worker id, from the log
local function latest (p, id)
  local pid
  for x in p:err():gmatch(("worker %d %%(pid (%%d+)%%) ready"):format(id)) do
    pid = tonumber(x)
  end
  return pid
end


-- KILL worker id: the standby s must take its place and accept; its
-- config's gen, and the pid killed
local function takenby (p, id, s)
  local victim = latest(p, id)
  H.kill(victim, "KILL")
  p:expect(("worker %d %%(pid %d%%) started %%(the standby%%)"):format(id, s),
           10, "err")
  return ready(p, id, s), victim
end


function TestStandby:test_a_standby_takes_a_dead_workers_place ()
  local p = master()
  H.ready(p, 2)
  local s = standby(p, 1)
  lu.assertEquals(#H.childpids(p.pid), 3)
  lu.assertNotStrContains(p:out(), "AFTER\t%d+\t" .. s)  -- no user code yet
  -- it becomes worker 2: after_fork runs there, with id 2, and it accepts
  local gen, victim = takenby(p, 2, s)
  lu.assertEquals(gen, 1)
  p:expect("EXIT\t2\t" .. victim .. "\n", 10)
  -- and a new standby is forked once the set is ready again
  local s2 = standby(p, 2)
  lu.assertNotEquals(s2, s)
  H.nworkers(p, 3)
end


-- with each strategy, the standby accepts what its place gets: under
-- reuseport that is the id's own socket, which nobody else takes from
local function takeover (accept)
  local p = master(("standby = 1, accept = %q,"):format(accept))
  H.ready(p, 2)
  local s = standby(p, 1)
  local _, victim = takenby(p, 1, s)
  for _ = 1, 20 do  -- every connection answered: none left to a dead socket
    local id, pid = ask(p.port)
    lu.assertNotNil(id)
    lu.assertNotEquals(pid, victim)
  end
end

function TestStandby:test_the_standby_takes_over_under_shared ()
  takeover("shared")
end

function TestStandby:test_the_standby_takes_over_under_reuseport ()
  takeover("reuseport")
end

function TestStandby:test_the_standby_takes_over_under_mutex ()
  takeover("mutex")
end

function TestStandby:test_the_standby_takes_over_under_master ()
  takeover("master")
end


function TestStandby:test_a_reload_renews_the_standby_with_the_new_code ()
  local p = master()
  H.ready(p, 2)
  local old = standby(p, 1)
  p:kill("HUP")
  local s = standby(p, 2)  -- forked once the new set is ready
  lu.assertNotEquals(s, old)
  lu.assertNil(H.pstate(old))  -- KILLed and reaped at the reload
  H.wait_until(function () return #H.childpids(p.pid) == 3 end, 10,
               "two workers and the standby")
  lu.assertEquals(takenby(p, 1, s), 2)  -- the reloaded config, not the first
end


function TestStandby:test_scaling_renews_the_standby ()
  local p = master()
  H.ready(p, 2)
  local old = standby(p, 1)
  p:kill("TTIN")
  H.ready(p, 3)
  local s = standby(p, 2)
  lu.assertNil(H.pstate(old))
  -- worker 3 was forked: the standby, a copy of the set without it,
  -- could not become it (it would say so and fail)
  lu.assertStrMatches(p:err(), ".*worker 3 %(pid %d+%) started\n.*")
  lu.assertNotStrContains(p:err(), "failed")
  -- the new worker (id 3) is one the standby can become
  lu.assertEquals(takenby(p, 3, s), 1)
end


function TestStandby:test_a_standby_that_dies_is_replaced_and_no_worker_is_touched ()
  local p = master()
  local pids = H.ready(p, 2)
  local s = standby(p, 1)
  H.kill(s, "KILL")
  p:expect("standby %(pid " .. s .. "%) exited: signal KILL; a new one in 0.1s",
           10, "err")
  local s2 = standby(p, 2)
  lu.assertNotEquals(s2, s)
  lu.assertNotStrContains(p:out(), "EXIT")  -- no worker's exit
  lu.assertEquals(H.ready(p, 2), pids)
  lu.assertEquals(H.zombies(p.pid), 0)
end


function TestStandby:test_stats_list_the_standby ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", standby = 2,
  on_start = announce,
  on_tick = function (m)
    local st = m:stats()
    if #st.standby == 2 then
      print("STANDBY", st.standby[1], st.standby[2], #st.workers)
      io.stdout:flush()
      m:stop()
    end
  end, tick = 0.05,
  fork = function (w) for c in w:connections() do c:close() end end}
]])
  local a, b, n = p:expect("STANDBY\t(%d+)\t(%d+)\t(%d+)\n")
  lu.assertEquals(n, "1")
  lu.assertNotEquals(a, b)
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertFalse(H.alive(tonumber(a)))
  lu.assertFalse(H.alive(tonumber(b)))
end


function TestStandby:test_a_graceful_stop_takes_the_standby_along ()
  local p = master()
  H.ready(p, 2)
  local s = standby(p, 1)
  p:kill("TERM")
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertFalse(H.alive(s))
end


function TestStandby:test_the_standby_leaves_when_the_master_is_killed ()
  local p = master()
  local pids = H.ready(p, 2)
  local s = standby(p, 1)
  p:kill("KILL")
  p:wait(10)
  for _, pid in ipairs({s, pids[1], pids[2]}) do  -- orphans: ours to reap
    H.reap(pid, 10)
  end
end


function TestStandby:test_a_dropped_reuseport_socket_is_not_kept_by_a_standby ()
  -- the standby holds every id's socket until it knows its id: at TTOU it
  -- goes, or the dropped id's socket would stay in the kernel's group and
  -- get its share of the connections, with nobody to accept them
  local p = master('standby = 1, accept = "reuseport", workers = 3,')
  H.ready(p, 3)
  standby(p, 1)
  p:kill("TTOU")
  p:expect("worker 3 %(pid %d+%) stopped", 10, "err")
  for _ = 1, 30 do
    local c = H.connect(p.port, 5)
    c:settimeout(2)
    c:send("who\n")
    lu.assertNotNil(c:receive("*l"))
    c:close()
  end
end


function TestStandby:test_a_stop_takes_the_standby_at_once ()
  -- a worker busy in its handler holds the stop; the standby is gone
  -- at its start
  local p = master("standby = 1, graceful_timeout = 10,")
  H.ready(p, 2)
  local s = standby(p, 1)
  local busy = H.connect(p.port, 5)  -- an open connection: a handler waits
  busy:send("who\n")
  busy:receive("*l")
  p:kill("TERM")
  p:expect("stopping %(TERM%)", 10, "err")
  H.wait_until(function () return H.pstate(s) == nil end, 5, "the standby gone")
  lu.assertFalse(p:exited())
  busy:close()
  lu.assertEquals({p:wait(10)}, {"exit", 0})
end


function TestStandby:test_a_standby_told_to_stop_leaves_and_is_replaced ()
  for _, sig in ipairs({"TERM", "INT"}) do
    local p = master()
    H.ready(p, 2)
    local s = standby(p, 1)
    p:expect("standby %(pid " .. s .. "%) ready", 10, "err")
    H.kill(s, sig)
    p:expect("standby %(pid " .. s .. "%) exited: exit 0; a new one in", 10, "err")
    local s2 = standby(p, 2)
    lu.assertEquals(takenby(p, 1, s2), 1)
    p:stop()
  end
end


-- a master with a 200 MB heap (its standby writes 32 MB of it before it
-- is ready) and its standby stopped (SIGSTOP) before it is: the pid
local function stoppedstandby (options)
  local p = master([[standby = 1,
  on_start = function (m)
    BIG = {}
    for i = 1, 2000000 do BIG[i] = ("%099d"):format(i) end
    announce(m)
  end,]] .. (options or ""))
  H.ready(p, 2, 60)
  local s
  for try = 1, 5 do  -- (until one is caught before it is ready)
    s = standby(p, try, true)
    H.kill(s, "STOP")
    H.sleep(0.1)  -- (a "ready" it sent before the STOP is logged by now)
    if not p:err():find("standby %(pid " .. s .. "%) ready to take") then break end
    if try == 5 then lu.fail("every standby was ready before it could be stopped") end
    H.kill(s, "KILL")  -- a new one comes
    H.kill(s, "CONT")
  end
  return p, s
end


function TestStandby:test_a_standby_that_is_not_ready_is_not_taken ()
  lu.skipIf(H.valgrind, "under valgrind a standby writes no pages: it is "
            .. "ready at once")
  local p, s = stoppedstandby()  -- so the respawn must fork
  local _, starts = p:err():gsub("worker 1 %(pid %d+%) started\n", "")
  H.kill(latest(p, 1), "KILL")
  H.wait_until(function ()
    local _, n = p:err():gsub("worker 1 %(pid %d+%) started\n", "")
    return n == starts + 1
  end, 10, "worker 1 forked again")
  lu.assertNotStrContains(p:err(), "(pid " .. s .. ") started")
  H.kill(s, "CONT")
  p:expect("standby %(pid " .. s .. "%) ready to take a place", 30, "err")
end


function TestStandby:test_a_standby_not_ready_by_boot_timeout_is_replaced ()
  lu.skipIf(H.valgrind, "under valgrind a standby writes no pages: it is "
            .. "ready at once")
  local p, s = stoppedstandby("boot_timeout = 5,")
  local _, forked = p:err():gsub("standby %(pid %d+%) forked", "")  -- s the last
  p:expect("standby %(pid " .. s .. "%) not ready after 5s %(boot_timeout%): KILL", 15, "err")
  p:expect("standby %(pid " .. s .. "%) exited: signal KILL; a new one in", 10, "err")
  H.wait_until(function () return H.pstate(s) == nil end, 10, "the stopped standby reaped")
  standby(p, forked + 1)  -- its replacement, ready
  lu.assertNotStrContains(p:out(), "EXIT")  -- no worker touched
end


function TestStandby:test_a_standby_ready_behind_a_busy_loop_is_not_killed ()
  lu.skipIf(H.valgrind, "under valgrind a standby may take more than the 1 s "
            .. "boot_timeout here to be ready")
  -- the log hook holds the loop for 2 s once the standby is forked: its
  -- "ready" and the 1 s deadline come due in the same loop turn
  local p = master([[standby = 1, boot_timeout = 1,
  log = function (level, msg)
    io.stderr:write(msg, "\n")
    if msg:find("standby %(pid %d+%) forked") and not HELD then
      HELD = true
      local t = os.clock() + 2  -- (CPU time: this loop spends it)
      while os.clock() < t do end
    end
  end,]])
  H.ready(p, 2)
  local s = standby(p, 1)
  H.sleep(0.5)
  lu.assertNotStrContains(p:err(), "not ready after")
  lu.assertEquals(H.pstate(s) ~= nil and H.pstate(s) ~= "Z", true, "the standby lives")
  takenby(p, 1, s)  -- and is taken
end


function TestStandby:test_usr1_renews_the_standby ()
  -- a standby forked before the log was reopened would write to the old
  -- file once it is a worker: the reopening renews it
  local path = H.tmpname()
  local function log () return H.readfile(path) or "" end
  local p = master(("standby = 1, log = %q,"):format(path))
  local s = standby(p, 1, false, log)
  os.rename(path, path .. ".1")
  p:kill("USR1")
  local s2 = standby(p, 1, false, log)  -- the first in the new file
  lu.assertNotEquals(s2, s)
  lu.assertNil(H.pstate(s))
  os.remove(path)
  os.remove(path .. ".1")
end


function TestStandby:test_the_option_is_checked ()
  for _, bad in ipairs({"-1", "1.5", '"yes"', "17"}) do
    local p = H.master(([[
local ok, err = pcall(prefork.start, {workers = 1, listen = "127.0.0.1:0",
  standby = %s, fork = function () end})
print(ok, err)
]]):format(bad), {wait = false})
    p:wait(10)
    lu.assertStrContains(p:out(), "false\tprefork.start: standby must be a "
                         .. "boolean or an integer from 0 to 16 (got ")
  end
end


os.exit(lu.LuaUnit.run())
