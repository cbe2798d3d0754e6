-- The messages a user sees for misuse: every public function walked with
-- wrong types and absurd values. Misuse raises a message that names the
-- function (or the option) and the value; a failing system call returns
-- nil, "what: strerror", errno. No message points inside the module
-- (a failing update's traceback follows its first line, as it should).

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"

local me = prefork.getpid()

--- f() must raise; its message must contain each of the strings given
-- and never a position inside the module's own files.
local function raises (f, ...)
  local ok, err = pcall(f)
  lu.assertFalse(ok, "no error; wanted: " .. table.concat({...}, " "))
  err = tostring(err)
  for _, want in ipairs{...} do lu.assertStrContains(err, want) end
  local first = err:match("^[^\n]*")  -- (a traceback may follow)
  lu.assertNil(first:match("src/prefork/[%w_]+%.lua:%d+:"), err)
  return err
end

--- f() must return nil, a message starting with what, and an errno
local function fails (f, what, errno)
  local r = table.pack(f())
  lu.assertEquals(r.n, 3)
  lu.assertNil(r[1])
  lu.assertStrContains(r[2], what)
  lu.assertEquals(r[3], errno)
end


TestMessages = {}

function TestMessages:tearDown () H.cleanup() end

function TestMessages:test_processes ()
  raises(function () prefork.fork(1) end, "bad argument #1", "function expected, got number")
  raises(function () prefork.wait("x") end, "bad argument #1", "number expected, got string")
  raises(function () prefork.wait(1.5) end, "number has no integer representation")
  raises(function () prefork.wait(-1, "later") end, "bad argument #2", "invalid option 'later'")
  raises(function () prefork.kill("x") end, "bad argument #1", "number expected, got string")
  raises(function () prefork.kill(1, "NOPE") end, "bad argument #2", "unknown signal 'NOPE'")
  raises(function () prefork.kill(1, 9999) end, "no such signal")
  -- the two pids that would hit the caller itself or everything
  raises(function () prefork.kill(0, 0) end, "0 and -1 would signal")
  raises(function () prefork.kill(-1, 0) end, "0 and -1 would signal")
  raises(function () prefork.kill(2 ^ 40 // 1) end, "not a pid")
  fails(function () return prefork.kill(2 ^ 22 + 7, 0) end, "kill: No such process", 3)
  raises(function () prefork.signame("x") end, "number expected, got string")
  lu.assertNil(prefork.signame(9999))
  raises(function () prefork.settitle({}) end, "bad argument #1", "string expected, got table")
  lu.assertEquals(H.childpids(me), {})
end

function TestMessages:test_listen_and_connections ()
  raises(function () prefork.listen() end, "bad argument #1 to 'listen'", "string expected, got no value")
  raises(function () prefork.listen("x") end, "bad address 'x'")
  raises(function () prefork.listen("127.0.0.1:99999") end, "bad address '127.0.0.1:99999' (bad port '99999')")
  raises(function () prefork.listen("http://127.0.0.1:80") end, "a URL")
  raises(function () prefork.listen(":18651") end, "no host: *:18651 or 0.0.0.0:18651")
  raises(function () prefork.listen("unix:") end, "path empty or too long")
  raises(function () prefork.listen("unix:/" .. ("x"):rep(200)) end, "path empty or too long")
  raises(function () prefork.listen("127.0.0.1:0", -5) end, "bad argument #2", "backlog must be a positive integer")
  raises(function () prefork.listen("127.0.0.1:0", "x") end, "bad argument #2", "number expected, got string")
  fails(function () return prefork.listen("no-such-host.invalid:80") end, "getaddrinfo: ", -2)
  raises(function () prefork.conn("x") end, "bad argument #1 to 'conn'", "number expected, got string")
  raises(function () prefork.conn(-1) end, "not an fd")
  fails(function () return prefork.conn(99999) end, "fcntl: Bad file descriptor", 9)
  raises(function () prefork.close(-1) end, "not an fd")
  raises(function () prefork.wait_fd("x") end, "not an fd, a connection, a socket or a file")

  local a, b = prefork.socketpair()
  raises(function () prefork.wait_fd(a, "q") end, "bad argument #2", "invalid option 'q'")
  raises(function () prefork.wait_fd(a, "r", "x") end, "bad argument #3", "number expected, got string")
  raises(function () a:read("n") end, "conn:read: invalid format 'n'")
  raises(function () a:read(-1) end, "bad argument #1 to 'read'", "negative size")
  raises(function () a:read({}) end, "bad argument #1 to 'read'")
  raises(function () a:write({}) end, "bad argument #1 to 'write'", "string expected, got table")
  raises(function () a:settimeout("x") end, "bad argument #1 to 'settimeout'", "number expected, got string")
  raises(function () a:setmaxline("x") end, "bad argument #1 to 'setmaxline'")
  raises(function () a.read(1) end, "prefork.conn expected, got number")
  b:close()
  raises(function () b:read("l") end, "attempt to use a closed connection")
  raises(function () b:write("x") end, "attempt to use a closed connection")
  local ok, err, errno = a:write(("x"):rep(1 << 20))  -- the peer is gone
  lu.assertNil(ok)
  lu.assertStrContains(err, "write: Broken pipe")
  lu.assertEquals(errno, 32)
  a:close()

  local l = assert(prefork.listen("127.0.0.1:0"))
  raises(function () l.accept(1) end, "prefork.listener expected, got number")
  fails(function () return prefork.peercred(l) end, "peercred: Transport endpoint is not connected", 107)
  l:close()
  raises(function () l:accept(0) end, "closed")
end

function TestMessages:test_fd_passing_and_values ()
  local a, b = prefork.socketpair()
  raises(function () prefork.sendfds(a, {}, {}) end, "bad argument #2", "string expected, got table")
  raises(function () prefork.sendfds(a, "x", "y") end, "bad argument #3", "table expected")
  raises(function () prefork.sendfds(a, "x", {true}) end, "item 1: not an fd, a connection, a socket or a file")
  raises(function () prefork.recvfds("x") end, "not an fd, a connection, a socket or a file")
  raises(function () prefork.recvfds(a, -1) end, "bad argument #2", "from 0 to 253")
  raises(function () prefork.recvfds(a, 1e9) end, "from 0 to 253")
  local null = assert(io.open("/dev/null"))
  fails(function () return prefork.sendfds(null, "x", {}) end, "sendmsg: Socket operation on non-socket", 88)
  null:close()
  raises(function () prefork.peercred("x") end, "not an fd, a connection, a socket or a file")
  a:close() b:close()

  raises(function () prefork.encode(print) end, "encode: cannot send a function")
  raises(function () prefork.encode(coroutine.create(print)) end, "encode: cannot send a thread")
  local deep, t = {}, nil
  t = deep
  for _ = 1, 300 do t[1] = {} t = t[1] end
  raises(function () prefork.encode(deep) end, "encode: tables nested deeper than 200")
  raises(function () prefork.decode("garbage") end, "corrupt message: not an encoded message")
  raises(function () prefork.decode("") end, "corrupt message: cut short")
  raises(function () prefork.sleep("x") end, "bad argument #1 to 'sleep'", "number expected, got string")
  raises(function () prefork.sleep(-1) end, "seconds must be a number >= 0")
  raises(function () prefork.sleep(0 / 0) end, "seconds must be a number >= 0")
end

function TestMessages:test_pool_options ()
  local fn = function () end
  raises(function () prefork.pool(nil) end, "prefork.pool: a table of options expected")
  raises(function () prefork.pool{} end, "prefork.pool: the function (opts[1] or run) must be a function or a name")
  raises(function () prefork.pool{fn, max = 0} end, "prefork.pool: max must be at least 1 (got 0)")
  raises(function () prefork.pool{fn, load = "x"} end, "prefork.pool: load must be a number >= 0 (got x)")
  raises(function () prefork.pool{fn, bogus = 1} end, "prefork.pool: unknown option 'bogus'")
  raises(function () prefork.pool{fn, timeout = -1} end, "prefork.pool: timeout must be a number > 0 (got -1)")
  raises(function () prefork.pool{fn, on_error = 1} end, "prefork.pool: on_error must be a function")
  lu.assertEquals(H.childpids(me), {})
end

function TestMessages:test_interp ()
  local interp = require "prefork.interp"
  raises(function () interp.initialisation_complete("x") end,
         "bad argument #1 to 'initialisation_complete' (table expected, got string)")
  raises(function () interp.initialisation_complete{max_servers = "4"} end,
         [[option 'max_servers' must be an integer]], [[got "4"]])
  raises(function () interp.initialisation_complete{bogus = 1} end, "unknown option 'bogus'")
  raises(function () interp.autoreload_also_check("a", 2) end,
         "bad argument #2 to 'autoreload_also_check' (string expected, got number)")
end

--- prefork.start's setup failures, nested ones included, all begin with
-- "prefork.start:" and leave no child and no fd behind
local function startfails (opts, ...)
  collectgarbage()
  local fds = H.fdcount(me)
  local err = raises(function () prefork.start(opts) end, "prefork.start: ", ...)
  lu.assertEquals(err:find("prefork.start: ", 1, true) ~= nil, true)
  collectgarbage()
  lu.assertEquals(H.fdcount(me), fds)
  lu.assertEquals(H.childpids(me), {})
end

function TestMessages:test_start ()
  local fork = function () end
  startfails(nil, "options must be a table (got nil)")
  startfails({workers = 2.5, fork = fork}, "prefork.start: workers must be a positive integer (got 2.5)")
  startfails({workers = 1e9, fork = fork}, "workers must be a positive integer")
  startfails({wrokers = 2, fork = fork}, "unknown option 'wrokers'")
  startfails({workers = 1}, "option 'fork' (the worker's body) is required")
  startfails({timeout = -1, fork = fork}, "timeout must be a number of seconds > 0, or false (got -1)")
  startfails({max_requests = -1, fork = fork}, "max_requests must be an integer >= 0 (got -1)")
  startfails({tick = 0, fork = fork}, "tick must be a number of seconds > 0 (got 0)")
  startfails({reload = "x", fork = fork}, [[reload must be "update" or "exec" (got "x")]])
  startfails({accept = "magic", fork = fork}, [[accept must be "shared", "reuseport", "mutex" or "master"]])
  -- nested: the listeners, the status endpoint, the pid file, the log
  startfails({listen = "http://127.0.0.1:80", fork = fork},
             [[listen[1] "http://127.0.0.1:80": bad address]], "a URL")
  startfails({listen = ":18651", fork = fork}, "no host")
  startfails({listen = {"127.0.0.1:0", "127.0.0.1:99999"}, fork = fork},
             [[listen[2] "127.0.0.1:99999": bad address '127.0.0.1:99999' (bad port '99999')]])
  startfails({listen = "no-such-host.invalid:80", fork = fork}, "getaddrinfo: ")
  startfails({listen = "fd:x", fork = fork}, "bad address 'fd:x'")
  startfails({listen = "fd:999", fork = fork}, "inherited fd 999 (fd:999): not an open fd")
  startfails({listen = "systemd", fork = fork}, [[no socket from systemd for "systemd"]])
  startfails({status = "x", listen = "127.0.0.1:0", fork = fork}, [[status "x": bad address 'x']])
  startfails({pid_file = "/nonexistent/dir/app.pid", listen = "127.0.0.1:0", fork = fork},
             "pid_file /nonexistent/dir/app.pid: ", "No such file or directory")
  startfails({log = "/nonexistent/dir/app.log", listen = "127.0.0.1:0", fork = fork},
             [[log "/nonexistent/dir/app.log": open: No such file or directory]])
  startfails({user = "no-such-user", listen = "127.0.0.1:0", fork = fork}, "no user 'no-such-user'")
  startfails({workers = 1, listen = "127.0.0.1:0", fork = fork,
              update = function () error("boom", 0) end}, "update failed: boom")
end


os.exit(lu.LuaUnit.run())
