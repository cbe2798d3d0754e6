-- fd passing: prefork.sendfds, recvfds and peercred over real sockets;
-- every fd that arrives is checked in /proc, and none may leak.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local socket = require "socket"

local me = prefork.getpid()

local function target (fd, pid)
  return H.sh(("readlink /proc/%d/fd/%d"):format(pid or me, fd)):gsub("\n$", "")
end

local function cloexec (fd)
  local info = H.readfile(("/proc/%d/fdinfo/%d"):format(me, fd)) or ""
  local flags = tonumber(info:match("flags:%s*(%d+)") or "0", 8)
  return flags & 0x80000 ~= 0  -- O_CLOEXEC
end

local function closefds (fds)
  for _, fd in ipairs(fds) do assert(prefork.close(fd)) end
end

local function nfds ()
  collectgarbage()
  collectgarbage()
  return H.fdcount(me)
end

TestFdpass = {}

function TestFdpass:tearDown () H.cleanup() end

function TestFdpass:test_data_and_fds_arrive_close_on_exec ()
  local a, b = prefork.socketpair()
  local x, y = prefork.socketpair()
  local f = assert(io.open("/dev/null"))
  local l = assert(prefork.listen("127.0.0.1:0"))
  lu.assertTrue(prefork.sendfds(a, "hello\0binary", {x, y:getfd(), f, l}))
  local data, fds = prefork.recvfds(b)
  lu.assertEquals(data, "hello\0binary")
  lu.assertEquals(#fds, 4)
  local x2 = prefork.conn(fds[1])  -- a received socket, usable at once
  y:write("through the passed fd\n")
  lu.assertEquals(x2:read(), "through the passed fd")
  lu.assertEquals({prefork.close(x2:getfd() + 1000)}, {nil, "close: Bad file descriptor", 9})
  lu.assertEquals(target(fds[1]), target(x:getfd()))
  lu.assertEquals(target(fds[2]), target(y:getfd()))
  lu.assertEquals(target(fds[3]), "/dev/null")
  lu.assertEquals(target(fds[4]), target(l:getfd()))
  for _, fd in ipairs(fds) do lu.assertTrue(cloexec(fd)) end
  for _, fd in ipairs(fds) do lu.assertNotEquals(fd, x:getfd()) end
  closefds{fds[2], fds[3], fds[4]}
  x2:close()
  f:close() l:close() x:close() y:close() a:close() b:close()
end

function TestFdpass:test_luasocket_objects_and_messages_keep_their_bounds ()
  local a, b = prefork.socketpair()
  local t = assert(socket.bind("127.0.0.1", 0))
  lu.assertTrue(prefork.sendfds(a:getfd(), "", {t}))
  lu.assertTrue(prefork.sendfds(a, "second", {}))
  local big = ("z"):rep(1000000)
  local pid = prefork.fork(function () prefork.sendfds(a, big, {}) end)
  local data, fds = prefork.recvfds(b:getfd())
  lu.assertEquals(data, "")
  lu.assertEquals(target(fds[1]), target(t:getfd()))
  closefds(fds)
  lu.assertEquals({prefork.recvfds(b)}, {"second", {}})
  lu.assertEquals(prefork.recvfds(b), big)
  prefork.wait(pid)
  t:close() a:close() b:close()
end

function TestFdpass:test_across_processes ()
  local a, b = prefork.socketpair()
  local pid = prefork.fork(function ()
    local l = assert(prefork.listen("127.0.0.1:0"))
    prefork.sendfds(a, l:address(), {l})
    -- no close: the fd stays the child's until it exits
  end)
  local addr, fds = prefork.recvfds(b)
  lu.assertEquals({prefork.wait(pid)}, {pid, "exit", 0})
  lu.assertStrMatches(target(fds[1]), "socket:%[%d+%]")
  -- the listener lives on in this process: a client can still connect
  local port = tonumber(addr:match(":(%d+)$"))
  local c = socket.tcp()
  c:settimeout(2)
  lu.assertTrue(c:connect("127.0.0.1", port) == 1)
  c:close()
  closefds(fds)
  a:close() b:close()
end

function TestFdpass:test_more_fds_than_asked_is_truncated_and_nothing_leaks ()
  local before = nfds()
  local a, b = prefork.socketpair()
  local f1, f2, f3 = io.open("/dev/null"), io.open("/dev/null"), io.open("/dev/null")
  prefork.sendfds(a, "three", {f1, f2, f3})
  f1:close() f2:close() f3:close()
  lu.assertEquals({prefork.recvfds(b, 2)}, {nil, "truncated", H.EMSGSIZE})
  -- maxfds 0 refuses every fd
  local f = io.open("/dev/null")
  prefork.sendfds(a, "one", {f})
  f:close()
  lu.assertEquals({prefork.recvfds(b, 0)}, {nil, "truncated", H.EMSGSIZE})
  prefork.sendfds(a, "in step", {})  -- the stream is still in step
  lu.assertEquals(prefork.recvfds(b), "in step")
  a:close() b:close()
  lu.assertEquals(nfds(), before)
end

function TestFdpass:test_end_of_stream_and_cut_frames_leak_nothing ()
  local before = nfds()
  local a, b = prefork.socketpair()
  a:close()
  lu.assertEquals({prefork.recvfds(b)}, {nil, "closed", 0})
  b:close()
  a, b = prefork.socketpair()
  -- a frame that announces 100 bytes, with an fd, then the peer goes
  local pid = prefork.fork(function ()
    local f = io.open("/dev/null")
    prefork.sendfds(a, ("x"):rep(100), {f})
  end)
  prefork.wait(pid)
  a:close()
  local _, first = prefork.recvfds(b)  -- the whole frame: fine
  closefds(first)
  lu.assertEquals({prefork.recvfds(b)}, {nil, "closed", 0})
  b:close()
  lu.assertEquals(nfds(), before)
end

function TestFdpass:test_a_corrupt_length_is_refused ()
  local before = nfds()
  local a, b = prefork.socketpair()
  a:write("\255\255\255\255garbage")
  lu.assertEquals({prefork.recvfds(b)}, {nil, "corrupt message", H.EPROTO})
  a:close() b:close()
  lu.assertEquals(nfds(), before)
end

function TestFdpass:test_a_frame_cut_short_is_closed ()
  local a, b = prefork.socketpair()
  a:write("\0\0\0\10abc")  -- 10 bytes announced, 3 sent
  a:close()
  lu.assertEquals({prefork.recvfds(b)}, {nil, "closed", 0})
  b:close()
end

function TestFdpass:test_timeout ()
  local a, b = prefork.socketpair()
  b:settimeout(0.1)
  lu.assertEquals({prefork.recvfds(b)}, {nil, "timeout", H.ETIMEDOUT})
  -- a timeout is a wait: a frame sent only once the call sleeps arrives
  -- (a call that returned at once would have returned the timeout)
  b:settimeout(10)
  local kid = H.while_asleep(function () assert(prefork.sendfds(a, "late", {})) end)
  lu.assertEquals({prefork.recvfds(b)}, {"late", {}})
  lu.assertEquals({prefork.wait(kid)}, {kid, "exit", 0})
  a:close() b:close()
end

function TestFdpass:test_peercred ()
  local a, b = prefork.socketpair()
  local pid, uid, gid = prefork.peercred(b)
  lu.assertEquals(pid, me)
  lu.assertEquals(uid, tonumber(H.sh("id -u")))
  lu.assertEquals(gid, tonumber(H.sh("id -g")))
  a:close()
  b:close()
  local ok, msg = prefork.peercred(0)  -- /dev/null is no socket
  lu.assertNil(ok)
  lu.assertStrContains(msg, "getsockopt: ")
end

function TestFdpass:test_misuse_raises ()
  local a, b = prefork.socketpair()
  lu.assertErrorMsgContains("string expected", prefork.sendfds, a, nil, {})
  lu.assertErrorMsgContains("table expected", prefork.sendfds, a, "x")
  lu.assertErrorMsgContains("item 1: not an fd, a connection, a socket or a file",
                            prefork.sendfds, a, "x", {true})
  lu.assertErrorMsgContains("not an fd", prefork.sendfds, a, "x", {-1})
  lu.assertErrorMsgContains("no getfd method", prefork.sendfds,
                            a, "x", {setmetatable({}, {__index = {}})})
  local many = {}
  for i = 1, 254 do many[i] = 0 end
  lu.assertErrorMsgContains("more than 253 fds", prefork.sendfds, a, "x", many)
  lu.assertErrorMsgContains("from 0 to 253", prefork.recvfds, b, 300)
  local f = io.open("/dev/null")
  f:close()
  lu.assertErrorMsgContains("closed", prefork.sendfds, a, "x", {f})
  a:write("buffered\n")
  a:write("more")
  b:read("l")
  lu.assertErrorMsgContains("connection has buffered data", prefork.recvfds, b)
  a:close() b:close()
end

os.exit(lu.LuaUnit.run())
