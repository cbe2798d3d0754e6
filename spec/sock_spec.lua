-- Listeners and connection objects, over real sockets.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local socket = require "socket"

--- A listener on 127.0.0.1, a LuaSocket client and the accepted conn.
local function pair ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local port = tonumber(l:address():match(":(%d+)$"))
  local client = H.connect(port, 5)
  local conn = assert(l:accept(5))
  return conn, client, l
end

--- write until a write fails (the peer closed): its results
local function fillup (conn)
  local ok, msg
  for _ = 1, 50 do
    ok, msg = conn:write(("x"):rep(65536))
    if not ok then break end
  end
  return ok, msg
end

TestListen = {}

function TestListen:tearDown () H.cleanup() end

function TestListen:test_port_0_tells_its_port ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  lu.assertStrMatches(l:address(), "127%.0%.0%.1:%d+")
  lu.assertNotEquals(l:address(), "127.0.0.1:0")
  lu.assertEquals(math.type(l:getfd()), "integer")
  lu.assertStrContains(tostring(l), "prefork.listener (127.0.0.1:")
  lu.assertTrue(l:close())
  lu.assertTrue(l:close())  -- twice is fine
  lu.assertEquals(tostring(l), "prefork.listener (closed)")
  lu.assertErrorMsgContains("attempt to use a closed listener", l.address, l)
end

function TestListen:test_ipv6_and_wildcards ()
  local l6 = assert(prefork.listen("[::1]:0"))
  lu.assertStrMatches(l6:address(), "%[::1%]:%d+")
  local star = assert(prefork.listen("*:0"))
  lu.assertStrMatches(star:address(), "0%.0%.0%.0:%d+")
  local bare = assert(prefork.listen(0))
  lu.assertStrMatches(bare:address(), "0%.0%.0%.0:%d+")
  l6:close() star:close() bare:close()
end

function TestListen:test_port_in_use_is_the_fail_triple ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local ok, msg, errno = prefork.listen(l:address())
  lu.assertNil(ok)
  lu.assertEquals(msg, "bind: Address already in use")
  lu.assertEquals(errno, 98)
  l:close()
end

function TestListen:test_bad_addresses_raise ()
  lu.assertErrorMsgContains("bad port '99999'", prefork.listen, "127.0.0.1:99999")
  lu.assertErrorMsgContains("bad port 'http'", prefork.listen, "127.0.0.1:http")
  lu.assertErrorMsgContains("IPv6 addresses go in brackets", prefork.listen, "::1:80")
  lu.assertErrorMsgContains("missing ']'", prefork.listen, "[::1:80")
  lu.assertErrorMsgContains("path empty or too long", prefork.listen, "unix:")
  lu.assertErrorMsgContains("path empty or too long", prefork.listen,
                            "unix:/" .. ("x"):rep(200))
  lu.assertErrorMsgContains("string expected", prefork.listen, {})
  local ok, msg = prefork.listen("no-such-host.invalid:80")
  lu.assertNil(ok)
  lu.assertStrContains(msg, "getaddrinfo")
end

function TestListen:test_unix_socket_stale_file_and_removal ()
  local path = H.tmpname() .. ".sock"
  local l = assert(prefork.listen("unix:" .. path))
  lu.assertEquals(l:address(), "unix:" .. path)
  local ok, msg = prefork.listen("unix:" .. path)  -- a live one is in use
  lu.assertNil(ok)
  lu.assertEquals(msg, "bind: Address already in use")
  l:close()
  lu.assertNil(io.open(path))  -- removed by the process that bound it
  -- a stale socket file (its server died) is replaced
  local pid = prefork.fork(function ()
    assert(prefork.listen("unix:" .. path))  -- no close, no __gc: it stays
  end)
  lu.assertEquals({prefork.wait(pid)}, {pid, "exit", 0})
  lu.assertEquals(H.sh("test -S " .. path .. " && echo left"), "left\n")
  l = assert(prefork.listen("unix:" .. path))
  l:close()
  -- a file that is not a socket is never removed
  H.writefile(path, "data")
  ok, msg = prefork.listen("unix:" .. path)
  lu.assertNil(ok)
  lu.assertStrContains(msg, "Address already in use")
  lu.assertEquals(H.readfile(path), "data")
  os.remove(path)
end

function TestListen:test_deferred_accept_waits_for_the_first_bytes ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  lu.assertTrue(l:setdefer(1))
  local port = tonumber(l:address():match(":(%d+)$"))
  local c = H.connect(port, 2)
  lu.assertEquals({l:accept(0.3)}, {nil, "timeout", H.ETIMEDOUT})  -- silent: not yet
  c:send("hi\n")
  local conn = assert(l:accept(2))
  lu.assertEquals(conn:read(), "hi")
  lu.assertErrorMsgContains("negative time", l.setdefer, l, -1)
  conn:close() c:close() l:close()
end

function TestListen:test_accept_timeout ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  lu.assertEquals({l:accept(0.1)}, {nil, "timeout", H.ETIMEDOUT})
  -- a timeout is a wait: a client that connects only once the call
  -- sleeps is accepted (a call that returned at once would have timed out)
  local port = tonumber(l:address():match(":(%d+)$"))
  local kid = H.while_asleep(function ()
    local c = H.connect(port, 5)
    c:send("late\n")
    c:close()
  end)
  local conn = assert(l:accept(10))
  lu.assertEquals(conn:read(), "late")
  lu.assertEquals({prefork.wait(kid)}, {kid, "exit", 0})
  conn:close() l:close()
end


TestConn = {}

function TestConn:tearDown () H.cleanup() end

function TestConn:test_read_formats ()
  local conn, client = pair()
  client:send("line one\nline two\r\nabcdefghij")
  lu.assertEquals(conn:read(), "line one")
  lu.assertEquals(conn:read("L"), "line two\r\n")
  lu.assertEquals(conn:read(3), "abc")
  lu.assertEquals(conn:read(0), "")
  lu.assertEquals({conn:read(2, 2)}, {"de", "fg"})
  client:send("\nrest")
  lu.assertEquals(conn:read("l"), "hij")
  client:close()
  lu.assertEquals(conn:read("a"), "rest")
  lu.assertEquals(conn:read("a"), "")
  lu.assertEquals({conn:read("l")}, {nil, "closed", 0})
  lu.assertEquals({conn:read(0)}, {nil, "closed", 0})
  lu.assertEquals({conn:read(5)}, {nil, "closed", 0})
  conn:close()
end

function TestConn:test_partial_line_at_end_and_sizes_across_eof ()
  local conn, client = pair()
  client:send("no newline")
  client:close()
  lu.assertEquals({conn:read("l", "l")}, {"no newline", nil, "closed", 0})
  conn:close()
  conn, client = pair()
  client:send("abc")
  client:close()
  lu.assertEquals(conn:read(10), "abc")  -- fewer only at the end
  conn:close()
end

function TestConn:test_large_reads_grow_the_buffer ()
  local conn, client = pair()
  local big = ("0123456789"):rep(100000)  -- 1 MB, no newline
  local pid = prefork.fork(function ()
    client:send(big .. "\n" .. big)
    client:close()
  end)
  client:close()
  lu.assertEquals(conn:read("l"), big)
  lu.assertEquals(conn:read("a"), big)
  prefork.wait(pid)
  conn:close()
end

function TestConn:test_timeouts_keep_unread_bytes ()
  local conn, client = pair()
  lu.assertIs(conn:settimeout(0.1), conn)
  client:send("partial")
  lu.assertEquals({conn:read("l")}, {nil, "timeout", H.ETIMEDOUT})
  -- nothing was lost, and the read waits: the rest of the line, sent
  -- only once it sleeps, completes it
  conn:settimeout(10)
  local kid = H.while_asleep(function () client:send(" line\n") end)
  lu.assertEquals(conn:read("l"), "partial line")
  lu.assertEquals({prefork.wait(kid)}, {kid, "exit", 0})
  conn:settimeout(nil)
  client:close()
  lu.assertEquals({conn:read("l")}, {nil, "closed", 0})
  conn:close()
end

function TestConn:test_write_and_peer ()
  local conn, client = pair()
  lu.assertTrue(conn:write("a", 1, "b", 2.5, "\n"))
  lu.assertEquals(client:receive("*l"), "a1b2.5")
  local host, port = conn:peer()
  lu.assertEquals(host, "127.0.0.1")
  lu.assertEquals(port, select(2, client:getsockname()) + 0)
  lu.assertErrorMsgContains("string expected", conn.write, conn, {})
  client:close()
  -- writing to a closed peer fails, never kills the process (no SIGPIPE)
  local ok, msg = fillup(conn)
  lu.assertNil(ok)
  lu.assertStrMatches(msg, "write: .*")
  conn:close()
end

function TestConn:test_write_timeout_when_the_peer_does_not_read ()
  local conn, client = pair()
  conn:settimeout(0.2)
  local ok, msg, en, sent
  for _ = 1, 1000 do
    ok, msg, en, sent = conn:write(("y"):rep(65536))
    if not ok then break end
  end
  lu.assertEquals({ok, msg, en}, {nil, "timeout", H.ETIMEDOUT})
  -- it says how much of the last write went out before the time was up
  lu.assertTrue(math.type(sent) == "integer" and sent >= 0 and sent < 65536)
  client:close()
  conn:close()
end

function TestConn:test_close_gc_and_tostring ()
  local conn, client = pair()
  local fd = conn:getfd()
  lu.assertStrContains(tostring(conn), "prefork.conn (fd " .. fd .. ")")
  lu.assertTrue(conn:close())
  lu.assertTrue(conn:close())
  lu.assertEquals(conn:getfd(), -1)
  lu.assertEquals(tostring(conn), "prefork.conn (closed)")
  lu.assertErrorMsgContains("attempt to use a closed connection", conn.read, conn)
  lu.assertEquals(H.rest(client), "")  -- the peer saw the close
  client:close()
  do
    local c2, cl2 = pair()
    local _ <close> = c2
    client = cl2
  end
  lu.assertEquals(H.rest(client), "")  -- __close closed it
  client:close()
end

function TestConn:test_close_with_data_writes_then_closes ()
  local conn, client = pair()
  lu.assertTrue(conn:close("last", " words", 1, "\n"))
  lu.assertEquals(conn:getfd(), -1)
  lu.assertEquals(H.rest(client), "last words1\n")  -- then the end of stream
  lu.assertTrue(conn:close())  -- twice is fine
  lu.assertErrorMsgContains("attempt to use a closed connection", conn.close, conn, "x")
  client:close()
  conn, client = pair()
  lu.assertErrorMsgContains("string expected", conn.close, conn, {})
  conn:close()
  client:close()
  -- a peer that went away: the write fails, the connection is closed anyway
  conn, client = pair()
  client:close()
  local ok, msg = fillup(conn)
  lu.assertNil(ok, msg)
  ok, msg = conn:close(("x"):rep(65536))
  lu.assertNil(ok)
  lu.assertStrMatches(msg, "write: .*")
  lu.assertEquals(conn:getfd(), -1)
  -- a Unix socket pair too
  local a, b = prefork.socketpair()
  lu.assertTrue(a:close("over\n"))
  lu.assertEquals(b:read("a"), "over\n")
  b:close()
  -- __close writes nothing (its second argument is the error)
  conn, client = pair()
  lu.assertFalse(pcall(function ()
    local _ <close> = conn
    error("boom")
  end))
  lu.assertEquals(conn:getfd(), -1)
  lu.assertEquals(H.rest(client), "")
  client:close()
end

function TestConn:test_maxline_bounds_a_line ()
  local a, b = prefork.socketpair()
  lu.assertIs(b:setmaxline(8), b)
  a:write("short\n0123456789abcdef\n")
  lu.assertEquals(b:read(), "short")
  lu.assertEquals({b:read("l")}, {nil, "too long", H.EMSGSIZE})
  lu.assertEquals(b:read(4), "0123")  -- nothing was lost
  b:setmaxline(nil)
  lu.assertEquals(b:read("L"), "456789abcdef\n")
  lu.assertErrorMsgContains("negative size", b.setmaxline, b, -1)
  a:close() b:close()
end

function TestConn:test_bad_formats_raise ()
  local conn, client = pair()
  lu.assertErrorMsgContains("invalid format", conn.read, conn, "x")
  lu.assertErrorMsgContains("negative size", conn.read, conn, -1)
  lu.assertErrorMsgContains("prefork.conn expected", conn.read, {})
  conn:close()
  client:close()
end

function TestConn:test_socketpair ()
  local a, b = prefork.socketpair()
  a:write("ping\n")
  lu.assertEquals(b:read(), "ping")
  lu.assertEquals(b:peer(), "")
  a:close()
  lu.assertEquals({b:read()}, {nil, "closed", 0})
  b:close()
end

function TestConn:test_no_fd_leaks ()
  local function fds () return H.fdcount(prefork.getpid()) end
  collectgarbage()
  local before = fds()
  local function churn ()  -- in a frame of its own: nothing stays referenced
    for i = 1, 50 do
      local conn, client, l = pair()
      conn:write("x")
      client:close()
      l:close()
      if i % 2 == 0 then conn:close() end  -- the rest: __gc
    end
  end
  churn()
  collectgarbage()
  collectgarbage()
  lu.assertEquals(fds(), before)
end

os.exit(lu.LuaUnit.run())
