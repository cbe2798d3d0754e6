-- Regressions: each test is a defect found in review, shown fixed.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local socket = require "socket"

TestRegress = {}

function TestRegress:tearDown () H.cleanup() end


-- a worker's child that outlives it holds the readiness pipe: the master
-- must not block reading it
function TestRegress:test_master_never_blocks_on_a_readiness_pipe ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    local pid = prefork.fork(function () require("socket").sleep(30) end)
    print("CHILD", pid) io.stdout:flush()
    error("config broken", 0)
  end}
]])
  -- the second death is seen while the first worker's child still holds
  -- its pipe
  p:expect("respawn in 0.2s", 10, "err")
  local first = tonumber(p:expect("CHILD\t(%d+)\n"))
  lu.assertTrue(H.alive(first))
  p:kill("TERM")  -- no more workers, no more children
  p:wait(10)
  for pid in p:out():gmatch("CHILD\t(%d+)\n") do  -- orphans: ours to reap
    H.kill(tonumber(pid), "KILL")
    H.reap(tonumber(pid))
  end
end


-- a log sink that stops the master while a spawn is failing
function TestRegress:test_log_sink_stopping_the_master_during_a_fork_failure ()
  local p = H.master([[
local M
prefork.start{workers = 2, listen = "127.0.0.1:0",
  on_start = function (m) M = m announce(m) end,
  log = function (level, msg)
    io.stderr:write(level, ": ", msg, "\n")
    if level == "error" and M then M:stop() end
  end,
  fork = function (w) for c in w:connections() do c:close() end end}
print("RETURNED")
]], {wait = false, prefix = H.nproc_prefix(2)})
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertStrContains(p:err(), "fork failed")
  lu.assertStrContains(p:out(), "RETURNED")
end


-- a slow before_fork must not make a crashing worker look ready
function TestRegress:test_timers_start_from_the_current_time ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  before_fork = function () require("socket").sleep(1.2) end,
  fork = function () os.exit(3) end}
]])
  p:expect("exited: exit 3 before it was ready; respawn in 0.1s", 10, "err")
  lu.assertNotStrContains(p:err(), "exit 3; respawn in 0s")
end


function TestRegress:test_a_master_object_is_inert_in_its_workers ()
  local p = H.master([[
local M
prefork.start{workers = 1, listen = "127.0.0.1:0",
  on_start = function (m) M = m announce(m) end,
  fork = function (w)
    local ok, err = pcall(M.stop, M)
    print("WORKER", ok, err) io.stdout:flush()
    for c in w:connections() do c:close() end
  end}
]])
  p:expect("WORKER\tfalse\t[^\n]*a master can only be used in its own process")
  lu.assertEquals(#H.childpids(p.pid), 1)
end


function TestRegress:test_one_master_per_process ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0",
  on_start = function (m)
    local ok, err = pcall(prefork.start, {workers = 1, fork = function () end})
    print("NESTED", ok, err) io.stdout:flush()
    announce(m)
    m:stop()
  end,
  fork = function (w) for c in w:connections() do c:close() end end}
]])
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertStrContains(p:out(), "another master runs in this process")
end


function TestRegress:test_a_worker_may_run_a_master_of_its_own ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    prefork.start{workers = 1, on_start = function (m)
      print("INNER", #m:workers()) io.stdout:flush()
      m:stop()
    end, fork = function () require("socket").sleep(5) end}
    print("INNER DONE") io.stdout:flush()
    for c in w:connections() do c:close() end
  end}
]])
  p:expect("INNER\t1\n")
  p:expect("INNER DONE")
end


function TestRegress:test_update_gets_a_working_master ()
  local p = H.master([[
prefork.start{workers = 2, listen = "127.0.0.1:0", on_start = announce,
  update = function (m)
    print("UPDATE", #m:workers(), #m:addresses()) io.stdout:flush()
    return {}
  end,
  fork = function (w) for c in w:connections() do c:close() end end}
]])
  p:expect("UPDATE\t0\t1\n")
end


function TestRegress:test_signals_ignored_before_stay_ignored_in_workers ()
  local p = H.server{workers = 1, prefix = "nohup ",  -- HUP ignored, as nohup does
                     handler = "c:write(prefork.getpid()) c:close()"}
  local kid = p.pids[1]
  local ign = H.readfile("/proc/" .. kid .. "/status"):match("SigIgn:%s*(%x+)")
  lu.assertEquals(tonumber(ign, 16) & 1, 1)  -- bit 0: SIGHUP
  H.kill(kid, "HUP")
  -- a HUP that killed it would have done so before it could answer again
  lu.assertEquals(H.request_ok(p.port), tostring(kid))
  lu.assertEquals(H.childpids(p.pid), {kid})
end


function TestRegress:test_a_stop_closes_the_masters_listeners_at_once ()
  local path = H.tmpname() .. ".sock"
  local p = H.server{workers = 1, listen = ('{"127.0.0.1:0", "unix:%s"}'):format(path),
    handler = [[
      io.stdout:write("BUSY\n") io.stdout:flush()
      c:read("l")
      c:close()]]}
  local c = H.connect(p.port, 5)
  p:expect("BUSY\n")
  p:kill("TERM")
  -- the worker is busy until this client speaks; the unix socket goes now
  H.wait_until(function ()
    return H.sh("test -e " .. path .. " || echo gone") == "gone\n"
  end, 10, "the socket file to go")
  lu.assertFalse(p:exited())
  c:send("done\n")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  c:close()
end


function TestRegress:test_huge_timeouts ()
  local a, b = prefork.socketpair()
  b:settimeout(1e300)
  a:write("x\n")
  lu.assertEquals(b:read(), "x")
  local l = assert(prefork.listen("127.0.0.1:0"))
  local port = tonumber(l:address():match(":(%d+)$"))
  local cl = H.connect(port, 2)
  lu.assertNotNil(l:accept(1e300))
  cl:close() l:close() a:close() b:close()
end


-- a script that read from a connection and ends normally: closing its
-- state unloads the library, and the read buffer kept for the next
-- connection was lost with it (memcheck and LeakSanitizer, which make
-- valgrind and make asan run as SPEC_LUA, saw 16 KiB definitely lost)
function TestRegress:test_a_state_that_closes_leaks_no_read_buffer ()
  local p = H.master([[
local a, b = prefork.socketpair()
a:write("hello\n")
print(b:read("l"))
a:close() b:close()
]], {wait = false})
  lu.assertEquals({p:wait(60)}, {"exit", 0}, p:err())
  lu.assertEquals(p:out(), "hello\n")
end


os.exit(lu.LuaUnit.run())
