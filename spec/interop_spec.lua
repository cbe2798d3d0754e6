-- Interop with the Lua ecosystem (docs/interop.md): prefork.connect and
-- conn:detach, prefork.socket (LuaSocket's surface) under socket.http and
-- redis-lua, a LuaSocket accept loop that sees the graceful stop, the
-- recipes of examples/ (cqueues, lua-http, LuaSec, a pool for blocking
-- drivers), and the Lua version check.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local socket = require "socket"

local ECONNREFUSED = 111

-- Debian packages the 5.3 builds of pure-Lua libraries (redis-lua,
-- lua-http's deps) that run on 5.4 too
local LUA53 = ";/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua"

local function have (cmd)
  return H.sh("command -v " .. cmd .. " 2>/dev/null") ~= ""
end

local function havefile (path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end


-- {======================================================
-- The backend: counts its open connections
-- =======================================================

-- One worker serving every request. A request ("q\n" or an HTTP GET) is
-- answered once N connections were open at once (or BOUND seconds went
-- by), 200 ms later, with "open <most open at once>". "hold\n" prints
-- HELD and is answered "released" once the file RELEASE exists.
local BACKEND = [[
local N, BOUND, RELEASE = tonumber(arg[1]), tonumber(arg[2]), arg[3]
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    local open, most = 0, 0
    w:serve(function (c)
      open = open + 1
      if open > most then most = open end
      local line = c:read("l") or ""
      local http = line:match("^GET ")
      if http then repeat local h = c:read("l") until h == nil or h == "" or h == "\r" end
      if line == "hold" then
        io.stdout:write("HELD\n")
        io.stdout:flush()
        for _ = 1, 600 do
          if io.open(RELEASE) then break end
          prefork.sleep(0.05)
        end
        c:write("released\n")
      else
        for _ = 1, BOUND * 100 do
          if most >= N then break end
          prefork.sleep(0.01)
        end
        prefork.sleep(0.2)
        local body = "open " .. most
        if http then
          c:write("HTTP/1.0 200 OK\r\nContent-Length: ", #body, "\r\n\r\n", body)
        else
          c:write(body, "\n")
        end
      end
      open = open - 1
    end)
  end}
]]

local function backend (n, bound, release)
  return H.master(BACKEND, {args = ("%d %g %s"):format(n or 10, bound or 5,
                                                        release or "-")})
end


-- One worker; each request (a line) makes one backend call, HOW (arg 2)
-- to the backend at ADDR (arg 1); the answer is the call's result.
local FRONT = [[
local ADDR, HOW = arg[1], arg[2]
package.path = package.path .. "]] .. LUA53 .. [["
local calls = {}
function calls.connect ()
  local b = assert(prefork.connect(ADDR, 10))
  assert(b:write("q\n"))
  return b:read("l")
end
function calls.hold ()
  local b = assert(prefork.connect(ADDR))
  assert(b:write("hold\n"))
  return b:read("l")
end
function calls.http ()
  local http, ltn12 = require "socket.http", require "ltn12"
  local t = {}
  local ok, code = http.request{url = "http://" .. ADDR .. "/",
    create = prefork.socket.tcp, sink = ltn12.sink.table(t)}
  return ok and code .. " " .. table.concat(t) or code
end
function calls.luasocket ()  -- plain LuaSocket: blocks the worker
  local s = require "socket".connect(ADDR:match("(.*):(%d+)"))
  s:send("q\n")
  return s:receive()
end
function calls.redis ()
  local redis = require "redis"
  local host, port = ADDR:match("(.*):(%d+)")
  local r = redis.connect{socket = prefork.socket.connect(host, tonumber(port), 10)}
  local got = r:blpop("q", 0)
  r.network.socket:close()
  return got[2]
end
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    w:serve(function (c)
      c:read("l")
      local ok, answer = pcall(calls[HOW])
      c:write("got ", tostring(answer), "\n")
    end)
  end}
]]

local function front (addr, how)
  return H.master(FRONT, {args = addr .. " " .. how})
end


-- n clients at once, each sends a line; their connections
local function clients (port, n)
  local cs = {}
  for i = 1, n do
    cs[i] = H.connect(port, 20)
    cs[i]:send("go\n")
  end
  return cs
end

-- the answers of the clients, counted
local function answers (cs)
  local seen = {}
  for _, c in ipairs(cs) do
    local line = c:receive("*l") or "(none)"
    seen[line] = (seen[line] or 0) + 1
    c:close()
  end
  return seen
end

-- }======================================================


-- {======================================================
-- prefork.connect, conn:detach
-- =======================================================

TestConnect = {}

function TestConnect:tearDown () H.cleanup() end


function TestConnect:test_connect_tcp_unix_and_v6 ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local c = assert(prefork.connect(l:address(), 5))
  local s = assert(l:accept(5))
  lu.assertTrue(c:write("ping\n"))
  lu.assertEquals(s:read("l"), "ping")
  s:write("pong\n")
  lu.assertEquals(c:read("l"), "pong")
  lu.assertEquals(select(2, c:peer()), tonumber(l:address():match(":(%d+)$")))
  c:close() s:close() l:close()

  local path = H.tmpname() .. ".sock"
  local u = assert(prefork.listen("unix:" .. path))
  c = assert(prefork.connect("unix:" .. path))
  s = assert(u:accept(5))
  c:write("u\n")
  lu.assertEquals(s:read("l"), "u")
  c:close() s:close() u:close()

  local l6 = prefork.listen("[::1]:0")
  if l6 then  -- (a machine without IPv6 has no ::1)
    c = assert(prefork.connect(l6:address(), 5, "tcp6"))
    s = assert(l6:accept(5))
    lu.assertEquals(c:peer(), "::1")
    c:close() s:close() l6:close()
  end
end


function TestConnect:test_failures_are_the_fail_triple ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local addr = l:address()
  l:close()  -- nobody listens there now
  lu.assertEquals({prefork.connect(addr)},
                  {nil, "connect: Connection refused", ECONNREFUSED})
  local ok, msg, code = prefork.connect("nosuchhost.invalid:80", 5)
  lu.assertNil(ok)
  lu.assertStrMatches(msg, "getaddrinfo: .+")
  lu.assertTrue(code < 0, "getaddrinfo's EAI_ code: " .. tostring(code))
  ok, msg, code = prefork.connect("unix:" .. H.tmpname() .. ".none")
  lu.assertEquals({ok, msg, code}, {nil, "connect: No such file or directory", 2})
  -- wrong family for the name: nothing to try
  ok, msg = prefork.connect("127.0.0.1:1", 1, "tcp6")
  lu.assertNil(ok)
  lu.assertStrMatches(msg, "getaddrinfo: .+")
end


-- a listener whose backlog is full drops the next SYNs: the connect waits
-- until its timeout
function TestConnect:test_timeout_bounds_the_connect ()
  local l = assert(prefork.listen("127.0.0.1:0", 1))
  local held, res = {}, nil
  for _ = 1, 10 do
    res = {prefork.connect(l:address(), 0.3)}
    if not res[1] then break end
    held[#held + 1] = res[1]
  end
  lu.assertEquals(res, {nil, "timeout", H.ETIMEDOUT})
  for _, c in ipairs(held) do c:close() end
  l:close()
end


function TestConnect:test_timeout_becomes_the_connections ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local c = assert(prefork.connect(l:address(), 0.2))
  local s = assert(l:accept(5))
  lu.assertEquals({c:read("l")}, {nil, "timeout", H.ETIMEDOUT})
  c:close() s:close() l:close()
end


function TestConnect:test_misuse_raises ()
  lu.assertErrorMsgContains("bad address 'http://x:80' (a URL",
                            prefork.connect, "http://x:80")
  lu.assertErrorMsgContains("IPv6 addresses go in brackets",
                            prefork.connect, "::1:80")
  lu.assertErrorMsgContains("bad port 'x'", prefork.connect, "127.0.0.1:x")
  lu.assertErrorMsgContains("bad address 'unix:' (path empty or too long)",
                            prefork.connect, "unix:")
  lu.assertErrorMsgContains("connect' (string expected, got number)",
                            prefork.connect, 80)
  lu.assertErrorMsgContains("connect' (string expected, got no value)",
                            prefork.connect)
  lu.assertErrorMsgContains("connect' (number expected, got string)",
                            prefork.connect, "127.0.0.1:1", "soon")
  lu.assertErrorMsgContains("connect' (negative timeout)",
                            prefork.connect, "127.0.0.1:1", -1)
  lu.assertErrorMsgContains("connect' (invalid option 'ipv9')",
                            prefork.connect, "127.0.0.1:1", 1, "ipv9")
end


function TestConnect:test_detach_gives_the_fd_and_the_unread_bytes ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local c = assert(prefork.connect(l:address(), 5))
  local s = assert(l:accept(5))
  c:write("first\nsecond\nthird")
  lu.assertEquals(s:read("l"), "first")
  lu.assertEquals(s:pending(), #"second\nthird")
  local fd, rest = s:detach()
  lu.assertEquals(rest, "second\nthird")
  lu.assertEquals(tostring(s), "prefork.conn (closed)")
  lu.assertEquals(s:getfd(), -1)
  lu.assertErrorMsgContains("closed connection", s.read, s)
  lu.assertTrue(s:close())  -- the fd is not its own any more
  local again = prefork.conn(fd)  -- still open: a new owner takes it
  c:write(" and more\n")
  lu.assertEquals(again:read("l"), " and more")
  again:close() c:close() l:close()
  -- nothing buffered: ""
  local a, b = prefork.socketpair()
  fd, rest = a:detach()
  lu.assertEquals(rest, "")
  lu.assertTrue(prefork.close(fd))
  b:close()
end


-- A connection the handler opened is not an idle client connection: a
-- backend call that waits for its answer through a graceful stop (longer
-- than the idle connections' last second) gets it.
function TestConnect:test_a_backend_call_outlives_the_idle_linger_at_a_stop ()
  local release = H.tmpname()
  os.remove(release)
  local b = backend(1, 0, release)
  local f = front(b.addr, "hold")
  local c = H.connect(f.port, 20)
  c:send("go\n")
  b:expect("HELD\n", 10)
  f:kill("TERM")
  H.sleep(2)  -- past the idle linger (a second): an idle read would be cut
  H.writefile(release, "")
  lu.assertEquals(c:receive("*l"), "got released")
  c:close()
  lu.assertEquals({f:wait(10)}, {"exit", 0})
end

-- }======================================================


-- {======================================================
-- Concurrency: 10 requests, one worker, each with a backend call
-- =======================================================

TestConcurrent = {}

function TestConcurrent:tearDown () H.cleanup() end


-- the backend answers none until it holds all 10 connections at once: a
-- worker that blocked in its backend call would hold one at a time
function TestConcurrent:test_prefork_connect ()
  local b = backend(10, 10)
  local f = front(b.addr, "connect")
  lu.assertEquals(answers(clients(f.port, 10)), {["got open 10"] = 10})
end


function TestConcurrent:test_socket_http_with_prefork_socket ()
  local b = backend(10, 10)
  local f = front(b.addr, "http")
  lu.assertEquals(answers(clients(f.port, 10)), {["got 200 open 10"] = 10})
end


-- redis-lua on a real redis-server: 10 handlers sit in BLPOP at once
function TestConcurrent:test_redis_lua_with_prefork_socket ()
  lu.skipIf(not have("redis-server"), "needs redis-server (Debian: redis-server)")
  lu.skipIf(not havefile("/usr/share/lua/5.3/redis.lua"),
            "needs redis-lua (Debian: lua-redis)")
  local port = H.freeport()
  local r = H.spawn(("redis-server --port %d --bind 127.0.0.1 --save '' "
                     .. "--appendonly no"):format(port))
  local admin = H.wait_until(function ()
    local s = socket.tcp()
    s:settimeout(5)
    if s:connect("127.0.0.1", port) then return s end
    s:close()
  end, 10, "redis-server")
  local function command (line)
    admin:send(line .. "\r\n")
    local first = assert(admin:receive("*l"))
    local n = tonumber(first:match("^%$(%d+)"))
    return n and assert(admin:receive(n + 2)) or first
  end
  local f = front("127.0.0.1:" .. port, "redis")
  local cs = clients(f.port, 10)
  H.wait_until(function ()
    return command("INFO clients"):match("blocked_clients:10\r\n")
  end, 10, "10 clients blocked in BLPOP")
  lu.assertEquals(command("RPUSH q 1 2 3 4 5 6 7 8 9 10"), ":10")
  local seen = answers(cs)
  for i = 1, 10 do lu.assertEquals(seen["got " .. i], 1, "answer " .. i) end
  admin:close()
  r:stop()
end

-- }======================================================


-- {======================================================
-- The recipes: examples/*.lua, each run as the README shows
-- =======================================================

TestRecipes = {}

function TestRecipes:tearDown () H.cleanup() end

--- examples/NAME with env (a string of NAME=value words) on port 0 and
-- args; returned once its address line and workers ready workers came
local function recipe (name, env, args, workers)
  local p = H.spawn(("env %s %s examples/%s.lua 0 %s"):format(env or "",
                    H.lua, name, args or ""))
  p.port = tonumber(p:expect("127%.0%.0%.1:(%d+)", 20))
  p.pids = H.ready(p, workers or 1, 20)
  return p
end

--- TERM, and every worker and the master exit 0
local function stops (p)
  p:kill("TERM")
  lu.assertEquals({p:wait(10 * (H.valgrind and 3 or 1))}, {"exit", 0})
  for _, pid in ipairs(p.pids) do
    lu.assertStrContains(p:err(), "(pid " .. pid .. ") stopped: exit 0\n")
  end
end

local function needs (module, package)
  local ok = pcall(require, module)
  lu.skipIf(not ok, ("needs %s (Debian: %s)"):format(module, package))
end


-- a LuaSocket accept loop blocked in poll(2) with no time limit leaves at
-- a graceful stop (the listener's fd becomes a dead socket in the worker)
function TestRecipes:test_a_luasocket_accept_loop_sees_the_stop ()
  local p = recipe("luasocket", "WORKERS=2", nil, 2)
  lu.assertEquals(H.request(p.port, "hi\n", 10), "HI\n")
  H.wait_until(function ()
    for _, pid in ipairs(p.pids) do
      local wchan = H.readfile("/proc/" .. pid .. "/wchan") or ""
      if not wchan:match("poll") then return false end
    end
    return true
  end, 10, "both workers blocked in LuaSocket's accept (poll)")
  stops(p)
end


-- one worker's cqueues loop answers a second connection while the first
-- one's "wait 5" is under way
function TestRecipes:test_cqueues_loop_serves_connections_at_once ()
  needs("cqueues", "lua-cqueues")
  local p = recipe("cqueues", "WORKERS=1")
  local slow = H.connect(p.port, 20)
  slow:send("wait 5\n")
  lu.assertEquals(H.request(p.port, "hi\n", 10), "HI\n")
  slow:settimeout(0)
  lu.assertEquals({slow:receive("*l")}, {nil, "timeout", ""})
  slow:settimeout(20)
  lu.assertEquals(slow:receive("*l"), "WAIT 5")
  slow:close()
  stops(p)
end


-- lua-http (Debian's 5.3 build, pure Lua) on a worker's listener
function TestRecipes:test_lua_http_server_on_a_workers_listener ()
  needs("cqueues", "lua-cqueues")
  lu.skipIf(not havefile("/usr/share/lua/5.3/http/server.lua"),
            "needs lua-http (Debian: lua-http)")
  local p = recipe("lua-http", "WORKERS=2", nil, 2)
  local url = "http://127.0.0.1:" .. p.port .. "/hello"
  for _ = 1, 2 do
    local pid = tonumber(H.sh("curl -s --max-time 10 " .. url)
                        :match("^GET /hello from pid (%d+)\n$"))
    lu.assertTrue(pid == p.pids[1] or pid == p.pids[2], tostring(pid))
  end
  stops(p)
end


-- LuaSec in worker:serve: a client that never finishes its handshake does
-- not hold up the worker's other TLS connections; a line that comes in two
-- records and an answer larger than the socket buffers come whole; and a
-- graceful stop ends the idle waits (a silent client, one between two
-- lines) after a second, not after the example's 30 s limit, while a
-- client whose first bytes come in that second is answered
function TestRecipes:test_luasec_tls_connections_do_not_block_each_other ()
  needs("ssl", "lua-sec")
  lu.skipIf(not have("openssl"), "needs openssl (Debian: openssl)")
  local ssl = require "ssl"
  local dir = H.sh("mktemp -d /tmp/lptls.XXXXXX"):match("[^\n]+")
  H.sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/key.pem "
        .. "-out %s/cert.pem -days 2 -subj /CN=localhost 2>/dev/null")
       :format(dir, dir))
  local p = recipe("tls", "WORKERS=1", dir .. "/cert.pem " .. dir .. "/key.pem")
  local function tls (raw)
    local s = assert(ssl.wrap(raw, {mode = "client", protocol = "any",
                                    verify = "none"}))
    s:settimeout(20)
    lu.assertTrue(s:dohandshake())
    return s
  end
  local silent = H.connect(p.port, 20)  -- in the handshake, saying nothing
  local late = H.connect(p.port, 20)  -- silent until the stop
  local c = tls(H.connect(p.port, 20))
  c:send("hel")
  H.sleep(0.2)  -- (two records)
  c:send("lo tls\n")
  lu.assertEquals(c:receive("*l"), "HELLO TLS")
  local big = ("0123456789abcdef"):rep(H.valgrind and 62500 or 500000)
  c:send(big .. "\n")  -- (8 MB: more than loopback's buffers hold)
  H.sleep(0.2)  -- (the answer fills them meanwhile)
  lu.assertTrue(c:receive(#big + 1) == big:upper() .. "\n", "the long line")
  p:kill("TERM")  -- the three still open
  H.sleep(0.2)
  late = tls(late)  -- in its last second
  H.sleep(0.1)  -- (its first line awaited apart)
  late:send("late\n")
  lu.assertEquals(late:receive("*l"), "LATE")
  lu.assertEquals({p:wait(H.valgrind and 20 or 5)}, {"exit", 0})
  lu.assertStrContains(p:err(), "(pid " .. p.pids[1] .. ") stopped: exit 0\n")
  lu.assertEquals(select(2, c:receive("*l")), "closed")
  lu.assertEquals(select(2, late:receive("*l")), "closed")
  c:close()
  late:close()
  silent:close()
  H.sh("rm -rf " .. dir)
end


-- a blocking call through a pool with load = 1: one worker has all three
-- calls under way at once, each in a pool process of its own
function TestRecipes:test_a_blocking_driver_through_a_pool ()
  local p = recipe("blocking", "WORKERS=1")
  local cs = {}
  for i = 1, 3 do
    cs[i] = H.connect(p.port, 30)
    cs[i]:send("2\n")
  end
  local pids = {}
  for i = 1, 3 do
    local line = cs[i]:receive("*l")
    local pid = line and line:match("^done by pool process (%d+); 3 at once$")
    lu.assertNotNil(pid, line)
    pids[pid] = true
    cs[i]:close()
  end
  lu.assertEquals(H.count(pids), 3)
  stops(p)
end

-- }======================================================


-- {======================================================
-- The Lua version check
-- =======================================================

TestVersion = {}

-- under Lua 5.1-5.3 (and LuaJIT, which says 5.1), require "prefork"
-- raises a message naming both versions, not a missing symbol
function TestVersion:test_older_luas_are_told_what_is_needed ()
  local tried = 0
  for _, v in ipairs{"5.1", "5.2", "5.3"} do
    if have("lua" .. v) then
      tried = tried + 1
      local out = H.sh(("lua%s -e 'package.path = \"src/?.lua;src/?/init.lua;\" "
        .. ".. package.path; package.cpath = \"build/?.so;\" .. package.cpath; "
        .. "require \"prefork\"' 2>&1; echo \"rc=$?\""):format(v))
      lu.assertStrContains(out, ("lua-prefork needs Lua 5.4 (this is Lua %s)")
                                :format(v))
      lu.assertStrContains(out, "rc=1\n")
    end
  end
  lu.skipIf(tried == 0, "needs lua5.1, lua5.2 or lua5.3 (Debian: lua5.1)")
end

-- }======================================================


os.exit(lu.LuaUnit.run())
