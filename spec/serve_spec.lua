-- worker:serve: many connections per worker on its event loop, one
-- coroutine each; reads, writes, sleeps and fd waits yield.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local socket = require "socket"
local core = require "prefork.core"

local connect = H.connect

TestServe = {}

function TestServe:tearDown () H.cleanup() end


-- every connection waits until all N have come: one worker that served
-- them one after another would never answer the first
function TestServe:test_one_worker_serves_many_connections_at_once ()
  local p = H.server{workers = 1, serve = true, head = "local N = 200",
    worker = "local arrived = 0", handler = [[
      c:read("l")
      arrived = arrived + 1
      while arrived < N do prefork.sleep(0.01) end
      c:write("all ", arrived, " ", prefork.getpid(), "\n")]]}
  local cs = {}
  for i = 1, 200 do
    cs[i] = connect(p.port)
    cs[i]:send("hi\n")
  end
  local pids = {}
  for i = 1, 200 do
    local line = assert(cs[i]:receive("*l"))
    local pid = line:match("^all 200 (%d+)$")
    lu.assertNotNil(pid, line)
    pids[pid] = true
    cs[i]:close()
  end
  lu.assertEquals(pids, {[tostring(p.pids[1])] = true})  -- its one worker
  lu.assertEquals(#H.childpids(p.pid), 1)
end


-- close(data) in a coroutine: a large answer to a slow reader yields
-- until it is all out (the worker serves others meanwhile), then closes
function TestServe:test_close_with_data_yields_until_written ()
  local p = H.server{workers = 1, serve = true, handler = [[
      local what = c:read("l")
      if what == "big" then return c:close(("z"):rep(4 * 1024 * 1024), "END") end
      c:close("small ", prefork.getpid(), "\n")]]}
  local big = connect(p.port)
  big:send("big\n")
  -- the big answer fills the socket: its coroutine waits (the server's
  -- side has bytes queued that this reader has not taken)
  local _, bigport = big:getsockname()
  H.wait_until(function ()
    local q = H.sh(("ss -tnH 'sport = :%d and dport = :%s'"):format(p.port, bigport))
      :match("^%S+%s+%d+%s+(%d+)")
    return q and tonumber(q) > 0
  end, 5, "the big answer queued")
  local small = connect(p.port)
  small:send("s\n")
  lu.assertStrMatches(assert(small:receive("*l")), "small %d+")
  lu.assertEquals(H.rest(small), "")  -- closed after it
  small:close()
  local all = H.rest(big)
  lu.assertEquals(#all, 4 * 1024 * 1024 + 3)
  lu.assertEquals(all:sub(-3), "END")
  big:close()
end


function TestServe:test_keepalive_and_pipelining ()
  local p = H.server{workers = 1, serve = true, handler = [[
      for line in function () return c:read("l") end do
        c:write("got ", line, "\n")
      end]]}
  local c = connect(p.port)
  c:send("a\nb\nc\n")  -- pipelined: answered in order
  lu.assertEquals(c:receive("*l"), "got a")
  lu.assertEquals(c:receive("*l"), "got b")
  lu.assertEquals(c:receive("*l"), "got c")
  for i = 1, 100 do
    c:send(i .. "\n")
    lu.assertEquals(c:receive("*l"), "got " .. i)
  end
  c:close()
end


function TestServe:test_a_handler_that_raises_costs_its_connection_only ()
  local p = H.server{workers = 1, serve = true, handler = [[
      local line = c:read("l")
      if line == "boom" then error("handler exploded") end
      c:write(prefork.getpid(), "\n")]]}
  local pid = H.request_ok(p.port, "x\n")
  local bad = H.request(p.port, "boom\n")
  lu.assertEquals(bad, "")  -- closed, nothing said
  lu.assertEquals(H.request_ok(p.port, "x\n"), pid)  -- same worker serves on
  p:expect("handler failed: [^\n]*handler exploded", 5, "err")
  lu.assertStrContains(p:err(), "stack traceback")
end


function TestServe:test_timeouts_in_a_coroutine ()
  local p = H.server{workers = 1, serve = true, handler = [[
      c:settimeout(0.2)
      local line, err = c:read("l")
      c:write(tostring(line), " ", tostring(err), "\n")]]}
  local c = connect(p.port)
  lu.assertEquals(c:receive("*l"), "nil timeout")
  c:close()
end


function TestServe:test_wait_fd_and_sleep_yield ()
  local p = H.server{workers = 1, serve = true,
    worker = "local a, b = prefork.socketpair()", handler = [[
      local cmd = c:read("l")
      if cmd == "wait" then
        c:write("waiting\n")
        local ok, err = prefork.wait_fd(b, "r", 5)
        c:write("woke ", tostring(ok), " ", b:read("l"), "\n")
      elseif cmd == "poke" then
        prefork.sleep(0.05)
        a:write("poked\n")
        c:write("done\n")
      elseif cmd == "short" then
        c:write(tostring(select(2, prefork.wait_fd(b, "r", 0.05))), "\n")
      end]]}
  local waiter = connect(p.port)
  waiter:send("wait\n")
  lu.assertEquals(waiter:receive("*l"), "waiting")  -- in its wait now
  lu.assertEquals(H.request_ok(p.port, "poke\n"), "done\n")
  lu.assertEquals(waiter:receive("*l"), "woke true poked")
  waiter:close()
  lu.assertEquals(H.request_ok(p.port, "short\n"), "timeout\n")
end


function TestServe:test_graceful_stop_closes_idle_and_finishes_busy ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    w:serve(function (c)
      while true do
        local line, err = c:read("l")
        if not line then
          io.stdout:write("READ ", err, "\n") io.stdout:flush()
          return
        end
        if line == "slow" then
          io.stdout:write("SLOW\n") io.stdout:flush()
          prefork.sleep(0.5)
        end
        c:write("answer ", line, "\n")
      end
    end)
    print("SERVE RETURNED", w:stopping()) io.stdout:flush()
  end}
]])
  local idle, busy = connect(p.port), connect(p.port)
  idle:send("one\n")
  lu.assertEquals(idle:receive("*l"), "answer one")  -- now idle
  busy:send("slow\n")
  p:expect("SLOW\n")  -- under way
  p:kill("TERM")
  lu.assertEquals(busy:receive("*l"), "answer slow")  -- finished
  lu.assertEquals(idle:receive("*l"), nil)  -- closed
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:out(), "READ stopping")
  lu.assertStrContains(p:out(), "SERVE RETURNED\ttrue")
  idle:close() busy:close()
end


-- a wait_fd said idle (a connection the handler detached, between two
-- requests: TLS, say) ends at a graceful stop as an idle conn:read does,
-- after the same last second; a plain one is the handler's and goes on
function TestServe:test_an_idle_wait_fd_ends_at_a_graceful_stop ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  graceful_timeout = 60,
  fork = function (w)
    w:serve(function (c)
      local idle = c:read("l") == "idle"
      c:write("waiting\n")
      local ok, err = prefork.wait_fd(c, "r", 60, idle)
      c:write(tostring(ok or err), "\n")
    end)
  end}
]])
  local idle, plain = connect(p.port), connect(p.port)
  idle:send("idle\n")
  lu.assertEquals(idle:receive("*l"), "waiting")
  plain:send("plain\n")
  lu.assertEquals(plain:receive("*l"), "waiting")
  p:kill("TERM")
  lu.assertEquals(idle:receive("*l"), "stopping")  -- (not after a minute)
  plain:send("go\n")
  lu.assertEquals(plain:receive("*l"), "true")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  idle:close() plain:close()
end


function TestServe:test_thousands_of_keepalive_connections ()
  local p = H.server{workers = 1, serve = true, options = "  backlog = 4096,",
    prefix = "prlimit --nofile=8192 ", handler = [[
      for line in function () return c:read("l") end do c:write(line, "\n") end]]}
  local client = H.tmpname() .. ".lua"
  H.writefile(client, ([[
local socket = require "socket"
local cs = {}
for i = 1, 3000 do
  cs[i] = socket.tcp()
  cs[i]:settimeout(10)
  assert(cs[i]:connect("127.0.0.1", %d))
end
for round = 1, 2 do
  for i = 1, 3000 do cs[i]:send(i .. "\n") end
  for i = 1, 3000 do assert(cs[i]:receive("*l") == tostring(i)) end
end
print("ok 3000")
]]):format(p.port))
  local c = H.spawn("prlimit --nofile=8192 " .. H.lua .. " " .. client)
  lu.assertEquals({c:wait(60)}, {"exit", 0})
  lu.assertEquals(c:out(), "ok 3000\n", c:err())
  lu.assertEquals(#H.childpids(p.pid), 1)
end


function TestServe:test_serve_outside_a_worker_raises ()
  lu.assertErrorMsgContains("not in a worker process",
    function () require("prefork.core").serve(nil, function () end) end)
  lu.assertErrorMsgContains("function expected",
    function () require("prefork.core").serve(nil, 42) end)
end


function TestServe:test_sleep_and_wait_fd_block_outside_serve ()
  -- the sleep blocks this process: a child that saw it asleep left its
  -- mark before the sleep returned (the sleep is long enough for the
  -- child to look; the mark is looked at before anything else waits)
  local mark = H.tmpname()
  local kid = H.while_asleep(function ()
    H.writefile(mark .. ".new", "saw it asleep")
    os.rename(mark .. ".new", mark)
  end)
  lu.assertTrue(prefork.sleep(1))
  lu.assertEquals(H.readfile(mark), "saw it asleep")
  lu.assertEquals({prefork.wait(kid)}, {kid, "exit", 0})
  local a, b = prefork.socketpair()
  lu.assertEquals({prefork.wait_fd(b, "r", 0.05)}, {nil, "timeout", H.ETIMEDOUT})
  -- a wait with a timeout waits: a byte written once it sleeps wakes it
  kid = H.while_asleep(function () a:write("x") end)
  lu.assertTrue(prefork.wait_fd(b, "r", 10))
  lu.assertEquals({prefork.wait(kid)}, {kid, "exit", 0})
  lu.assertTrue(prefork.wait_fd(b:getfd(), "w"))
  lu.assertErrorMsgContains("invalid option", prefork.wait_fd, b, "x")
  lu.assertErrorMsgContains("seconds must be a number >= 0", prefork.sleep, -1)
  a:close() b:close()
end



-- recvfds in a task yields also in the middle of a frame: while one
-- connection waits for the rest of a frame its peer began, the worker
-- serves the others
function TestServe:test_recvfds_yields_in_the_middle_of_a_frame ()
  local p = H.server{workers = 1, serve = true,
    worker = "local a, b = prefork.socketpair()", handler = [[
      local cmd = c:read("l")
      if cmd == "recv" then
        c:write("waiting\n")
        local data, fds = prefork.recvfds(a)
        c:write(tostring(data), " ", tostring(fds and #fds), "\n")
      elseif cmd == "part" then  -- a header of 5 bytes, then 2 of them
        b:write("\0\0\0\5ab")
        c:write("sent part\n")
      elseif cmd == "rest" then
        b:write("cde")
        c:write("sent rest\n")
      else
        c:write("pong\n")
      end]]}
  local waiter = connect(p.port)
  waiter:send("recv\n")
  lu.assertEquals(waiter:receive("*l"), "waiting")
  lu.assertEquals(H.request_ok(p.port, "part\n"), "sent part\n")
  lu.assertEquals(H.request_ok(p.port, "ping\n"), "pong\n")
  lu.assertEquals(H.request_ok(p.port, "rest\n"), "sent rest\n")
  lu.assertEquals(waiter:receive("*l"), "abcde 0")
  waiter:close()
end

-- A read that found the socket empty last time waits before its next
-- recv; with timeout 0 it still returns what is already there
function TestServe:test_timeout_zero_reads_what_is_there ()
  local function case ()
    local a, b = prefork.socketpair()
    a:settimeout(0)
    b:write("x\n")
    local r1 = {a:read("l")}
    b:write("y\n")
    local r2 = {a:read("l")}
    local r3 = {a:read("l")}
    a:close() b:close()
    return {r1, r2, r3}
  end
  local want = {{"x"}, {"y"}, {nil, "timeout", H.ETIMEDOUT}}
  lu.assertEquals(case(), want)  -- outside a task: poll
  local got
  core.run(function () got = case() end)  -- in a task: the loop
  lu.assertEquals(got, want)
end

-- a task's waits on one connection keep libev's registration; a closed
-- fd whose number comes back (conn:close, prefork.close, conn:detach (its
-- next owner closes it), a pool channel
-- taking a connection over) is registered anew: its wait is woken
function TestServe:test_a_reused_fd_number_wakes_its_wait ()
  local closers = {
    function (a) a:close() end,
    function (a)  -- handed over, then closed by another library
      local s = require("socket").tcp()
      s:close()
      s:setfd((a:detach()))
      s:close()
    end,
    function (a) core.chan(a):close() end,
  }
  for i, closeit in ipairs(closers) do
    local got
    core.run(function ()
      local a, b = prefork.socketpair()
      core.go(function () prefork.sleep(0.02) b:write("one\n") end)
      local first = a:read("l")  -- a wait on fd N that ended ready
      local n = a:getfd()
      closeit(a)
      local c, d = prefork.socketpair()  -- N again
      core.go(function () prefork.sleep(0.02) d:write("two\n") end)
      c:settimeout(5)
      got = {first, c:getfd() == n, c:read("l")}
      b:close() c:close() d:close()
    end)
    lu.assertEquals(got, {"one", true, "two"}, "closer " .. i)
  end
end


os.exit(lu.LuaUnit.run())
