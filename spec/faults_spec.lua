-- Faults a probe of the running system found: fd exhaustion must not
-- turn a worker into a busy loop that floods the log, and what a worker
-- started goes with it when it is killed at the end of a stop. (The
-- master's death, the last worker and recvfds in the middle of a frame
-- are in operate_spec and serve_spec.)

local lu = require "luaunit"
local H = require "helpers"

-- a worker answers a line with "ok"; "sleep" waits in os.execute
local SERVER = [[
local strategy = ...
prefork.start{workers = 2, listen = "127.0.0.1:0", on_start = announce,
  accept = strategy, graceful_timeout = 0.5,
  fork = function (w)
    w:serve(function (c)
      if c:read("l") == "sleep" then os.execute("sleep 1000") end
      c:close("ok\n")
    end)
  end}
]]

TestFaults = {}

function TestFaults:tearDown () H.cleanup() end


-- with 64 fds and 200 idle connections every accept fails (EMFILE): the
-- workers pause instead of spinning, log once, and serve again after
local function emfile (strategy)
  local p = H.server{code = SERVER, prefix = "prlimit --nofile=64 ", args = strategy}
  local pids = p.pids
  local cs = {}
  for i = 1, 200 do cs[i] = H.connect(p.port) end
  p:expect("accept: Too many open files; it pauses", 5, "err")
  -- while the episode lasts, a second line would be a flood
  H.wait_until(function ()
    local _, paused = p:err():gsub("accept: Too many open files", "")
    return paused >= 1 and paused <= 2 and H.alive(pids[1]) and H.alive(pids[2])
           and p:err():match("after each failure until one works")
  end, 5, "one line per worker")
  for _, c in ipairs(cs) do c:close() end
  lu.assertEquals(H.request_ok(p.port, "x\n", 10), "ok\n")
  -- each worker that paused takes connections again once its pause is
  -- over: connections held open, one every 40 ms (the first may come
  -- while a pause lasts, and idle ones, one after another, may all go to
  -- the worker first in the listener's queue until the balance sends the
  -- next ones to the other), at most 20 at once (so that the other worker
  -- does not run out of fds in its turn)
  local paused = {}
  for pid in p:err():gmatch("%(pid (%d+)%): accept: Too many open files") do
    paused[#paused + 1] = pid
  end
  local held = {}
  H.wait_until(function ()
    local err, back = p:err(), true
    for _, pid in ipairs(paused) do
      back = back and err:match("%(pid " .. pid .. "%): accept works again") ~= nil
    end
    if back then return true end
    if #held == 20 then table.remove(held, 1):close() end
    held[#held + 1] = H.connect(p.port)
    H.sleep(0.04)
  end, 15, function ()
    return "each worker that paused accepting again, in the err:\n" .. p:err()
  end)
  for _, c in ipairs(held) do c:close() end
  local _, lines = p:err():gsub("accept: Too many open files", "")
  lu.assertTrue(lines <= 4, "the log:\n" .. p:err():gsub("%%", "%%%%"))
  lu.assertEquals(H.childpids(p.pid), pids)  -- nobody died of it
end

function TestFaults:test_fd_exhaustion_pauses_accepting_shared ()
  emfile("shared")
end

function TestFaults:test_fd_exhaustion_pauses_accepting_reuseport ()
  emfile("reuseport")
end


-- a worker that pauses after EMFILE leaves the listener's queue of
-- exclusive waiters for the pause: a connection that comes meanwhile goes
-- to its idle sibling, not to the paused worker (libev keeps a stopped
-- watcher's entry until an event comes for it: that event would wake the
-- paused worker alone, and the connection would wait the pause out)
function TestFaults:test_a_paused_worker_leaves_the_queue_to_its_sibling ()
  lu.skipIf(H.valgrind, "valgrind's fd limit is below the kernel's: an "
            .. "accept with no connection waiting does not fail there")
  local p = H.server{prefix = "prlimit --nofile=64 ", accept = "shared",
    serve = true, handler = [[
      local pid = prefork.getpid()
      c:read("l")
      if not hogs then  -- a worker's first: every fd taken, and this
        hogs = {}       -- connection's one freed as it closes
        repeat local f = io.open("/dev/null"); hogs[#hogs + 1] = f until not f
        c:close("ok ", pid, "\n")
      else
        local f = io.open("/dev/null")  -- none: this one took the last
        if f then f:close() end
        prefork.sleep(0)  -- (the accept loop goes on first, and fails)
        c:close(f and "ok " or "full ", pid, "\n")
      end]]}
  -- connections one at a time, both workers waiting, go to the worker
  -- first in the queue: its first, then one into its last fd, after which
  -- its accept loop's next accept fails (EMFILE): it pauses, first in the
  -- queue still, with its entry exclusive
  local full = H.wait_until(function ()
    H.sleep(0.05)  -- (both back in their waits)
    return H.request(p.port, "x\n", 5):match("^full (%d+)\n$")
  end, 10, "a connection into a worker's last fd")
  local other = full == tostring(p.pids[1]) and p.pids[2] or p.pids[1]
  -- a connection in the pause (0.5 s from before that answer), once the
  -- paused worker sleeps again (the kernel passes over one that does not),
  -- goes to the sibling; to the paused worker, it would wait the pause out
  H.sleep(0.1)
  lu.assertEquals(H.request(p.port, "x\n", 5), "ok " .. other .. "\n")
  p:expect("%(pid " .. full .. "%): accept: Too many open files", 5, "err")
end


function TestFaults:test_what_a_worker_started_goes_with_it_at_the_stop ()
  local p = H.server{code = SERVER, args = "shared"}
  local pids = p.pids
  local c = H.connect(p.port)
  c:send("sleep\n")
  local sleeper = H.wait_until(function ()
    for _, w in ipairs(pids) do
      for _, k in ipairs(H.descendants(w)) do
        if H.cmdline(k):match("^sleep 1000") then return k end
      end
    end
  end, 5, "the sleep")
  p:kill("TERM")
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertStrContains(p:err(), "still running after 0.5s: KILL")
  H.wait_until(function () return not H.alive(sleeper) end, 5, "the sleep to go")
  c:close()
end


os.exit(lu.LuaUnit.run())
