-- More of the master's life: fork failures, idleness, what a worker
-- inherits, the stop flag, INT twice, restarts on the same port, logging.

local lu = require "luaunit"
local H = require "helpers"
local socket = require "socket"

local SERVE = [[
local function serve (w) for c in w:connections() do c:close() end end
]]

TestLifecycle = {}

function TestLifecycle:tearDown () H.cleanup() end


function TestLifecycle:test_fork_failure_is_retried_with_backoff_never_fatal ()
  -- a real EAGAIN from fork: an unprivileged user at its process limit
  local p = H.master(SERVE .. [[
prefork.start{workers = 3, listen = "127.0.0.1:0", on_start = announce,
              fork = serve}]], {wait = false, prefix = H.nproc_prefix(2)})
  p:expect("fork failed: Resource temporarily unavailable; retry in 0.1s", 10, "err")
  p:expect("fork failed: Resource temporarily unavailable; retry in 0.2s", 10, "err")
  lu.assertFalse(p:exited())  -- the master lives
  lu.assertEquals(#H.childpids(p.pid), 1)
end


function TestLifecycle:test_an_idle_master_never_wakes ()
  local p = H.server{handler = "c:close()"}
  -- scenario: past the timers each fork arms for the worker's first
  -- second (their firing shows nowhere)
  H.sleep(1.2)
  local function switches ()
    local s = H.readfile("/proc/" .. p.pid .. "/status")
    return tonumber(s:match("voluntary_ctxt_switches:%s*(%d+)"))
  end
  local before = switches()
  H.sleep(2)  -- scenario: the time in which nothing may wake it
  lu.assertEquals(switches(), before)
end


function TestLifecycle:test_a_worker_inherits_no_master_only_fd ()
  local p = H.server{workers = 3, listen = '{"127.0.0.1:0", "[::1]:0"}',
                     handler = 'c:read("a") c:close()'}
  local kids = p.pids
  local fds = {}
  for i, k in ipairs(kids) do fds[i] = H.fdcount(k) end
  local held = {}
  for i = 1, 3 do  -- every worker past its first accept, holding one
    held[i] = H.connect(p.port, 5)
  end
  H.wait_until(function ()
    for i, k in ipairs(kids) do
      if H.fdcount(k) ~= fds[i] + 1 then return false end
    end
    return true
  end, 5, "each worker holding a connection")
  -- what the master opened itself: not inherited from here, not a listener.
  -- Pipes and sockets have inode numbers; epoll sets and eventfds all read
  -- "anon_inode:[...]", so those are told apart by what fdinfo lists
  -- (an inherited copy would list the same watched fds, eventfd counts).
  local mine, master = H.fdtargets(require("prefork").getpid()), H.fdtargets(p.pid)
  local own = {}
  for t in pairs(master) do
    if not mine[t] and t:match("^pipe:") then own[#own + 1] = t end
  end
  local function anon (pid)  -- fdinfo bodies of its anon_inode fds
    local t = {}
    for fd, target in H.sh("ls -l /proc/" .. pid .. "/fd"):gmatch(" (%d+) %-> (anon_inode:[^\n]+)") do
      local info = (H.readfile("/proc/" .. pid .. "/fdinfo/" .. fd) or "")
        :gsub("pos:[^\n]*\n", ""):gsub("flags:[^\n]*\n", ""):gsub("mnt_id:[^\n]*\n", "")
        :gsub("ino:[^\n]*\n", "")
      t[target .. "\n" .. info] = true
    end
    return t
  end
  local manon = anon(p.pid)
  lu.assertNotNil(next(manon), "the master has its epoll set")
  for _, k in ipairs(kids) do
    local theirs = H.fdtargets(k)
    for _, t in ipairs(own) do
      lu.assertNil(theirs[t], "worker " .. k .. " has the master's " .. t)
    end
    for body in pairs(anon(k)) do
      lu.assertNil(manon[body], "worker " .. k .. " has the master's " .. body)
    end
  end
  for i = 1, 3 do held[i]:close() end
end


function TestLifecycle:test_a_busy_worker_sees_stopping_and_finishes ()
  local p = H.master([[
local socket = require "socket"
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    local c = w:accept()
    io.stdout:write("ACCEPTED\n") io.stdout:flush()
    while not w:stopping() do socket.sleep(0.01) end
    c:write("saw the stop\n")
    c:close()
    print("ACCEPT AFTER STOP", w:accept())
  end}
]])
  local c = H.connect(p.port, 5)
  p:expect("ACCEPTED\n")
  p:kill("TERM")
  lu.assertEquals(c:receive("*l"), "saw the stop")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:out(), "ACCEPT AFTER STOP\tnil\tstopping")
end


function TestLifecycle:test_int_twice_stops_at_once ()
  local p = H.server{workers = 1, head = 'local socket = require "socket"',
    handler = 'io.stdout:write("BUSY\\n") io.stdout:flush() socket.sleep(30)'}
  local c = H.connect(p.port, 5)
  p:expect("BUSY\n")
  p:kill("INT")
  p:expect("stopping %(INT%): graceful stop", 5, "err")
  lu.assertFalse(p:exited())  -- graceful: the worker is busy
  p:kill("INT")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:err(), "immediate stop")
  c:close()
end


function TestLifecycle:test_a_restart_binds_the_same_port_at_once ()
  local function server (port)
    return H.server{listen = '"127.0.0.1:" .. arg[1]', args = port,
                    handler = 'c:write("x") c:close()'}
  end
  local p = server("0")
  for _ = 1, 20 do H.request_ok(p.port) end  -- server-side closes: TIME_WAIT
  p:kill("TERM")
  p:wait(5)
  local again = server(tostring(p.port))
  lu.assertEquals(again.port, p.port)
  lu.assertEquals(H.request_ok(p.port), "x")
end


function TestLifecycle:test_backlog_reaches_listen ()
  local p = H.server{workers = 1, options = "  backlog = 77,", handler = "c:close()"}
  local ss = H.sh("ss -ltnH 'sport = :" .. p.port .. "'")
  lu.assertStrMatches(ss, "LISTEN%s+%d+%s+77%s.*")
end


function TestLifecycle:test_log_option_replaces_the_sink ()
  local p = H.master(SERVE .. [[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  log = function (level, msg) io.stdout:write("LOG ", level, " ", msg, "\n")
                              io.stdout:flush() end,
  fork = serve}]])
  p:expect("LOG info worker 1 %(pid %d+%) started")
  p:kill("TERM")
  p:wait(5)
  lu.assertStrContains(p:out(), "LOG info stopped")
  lu.assertNotStrContains(p:err(), "prefork[")
end


function TestLifecycle:test_a_ready_worker_that_exits_is_replaced_at_once ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    local c = w:accept()  -- one connection, then the worker ends (exit 0)
    c:write(prefork.getpid(), "\n")
    c:close()
  end}
]])
  local pids = {}
  for i = 1, 5 do pids[i] = H.request_ok(p.port) end
  for i = 2, 5 do lu.assertNotEquals(pids[i], pids[i - 1]) end
  lu.assertStrContains(p:err(), "exited: exit 0; respawn in 0s")
  lu.assertNotStrContains(p:err(), "before it was ready")
end


function TestLifecycle:test_wait_finds_children_the_loop_reaped ()
  local p = H.master([[
local child
prefork.start{workers = 1, listen = "127.0.0.1:0",
  on_start = function (m)
    child = prefork.fork(function () os.exit(5) end)
    announce(m)
  end,
  on_worker_exit = function (m)  -- long after the loop reaped the child
    local pid, how, code = prefork.wait(child)
    print("WAIT", pid == child, how, code, select(2, prefork.wait(child)))
    io.stdout:flush()
    m:stop()
  end,
  fork = function (w) require("socket").sleep(0.5) end}
]])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:out(), "WAIT\ttrue\texit\t5\twait: No child processes\t10")
end


function TestLifecycle:test_wait_in_a_hook_does_not_steal_a_worker ()
  local p = H.master([[
local socket = require "socket"
local done = false
prefork.start{workers = 1, listen = "127.0.0.1:0", graceful_timeout = 2,
  fork = function (w) for c in w:connections() do c:close() end end,
  on_start = function (m)
    local helper = prefork.fork(function () socket.sleep(0.3) end)
    local victim = m:workers()[1].pid
    prefork.kill(victim, "KILL")  -- dies while the hook waits
    -- any child: the worker's exit goes to the master, and the wait does
    -- not block for the others (workers may outlive the hook)
    print("ANY", prefork.wait())
    local pid, how, code = prefork.wait(helper)
    print("WAITED", pid == helper, how, code)
    announce(m)
  end,
  on_worker_exit = function (m, info)
    print("EXIT", info.how, info.code, info.respawn_in ~= nil)
    io.stdout:flush()
    if not done then done = true; m:stop() end
  end}
print("RETURNED")
]])
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  local out = p:out()
  lu.assertStrContains(out, "ANY\tnil\trunning\n")
  lu.assertStrContains(out, "WAITED\ttrue\texit\t0")
  lu.assertStrContains(out, "EXIT\tsignal\t9\ttrue")
  lu.assertStrContains(out, "RETURNED")
end


os.exit(lu.LuaUnit.run())
