-- prefork.interp against Debian's real /usr/bin/prefork-interp (7.0.0)
-- as the client, and against fake clients written here. Each test runs
-- its scripts from a fresh temporary cwd (the wrapper's ident covers the
-- cwd, so each test gets servers of its own), learns the pids of what it
-- started from files the test script writes, and kills and reaps them.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local core = require "prefork.core"
local socket = require "socket"
local unix = require "socket.unix"

local ROOT = assert(io.popen("pwd")):read("l")
local FIXTURE = ROOT .. "/spec/fixtures/interp_test.lua"
local WRAPPER = "/usr/bin/prefork-interp"

-- the interpreter: the combined #! form for plain lua5.4; under the
-- sanitizers or valgrind (SPEC_LUA is a command) the separate-word form,
-- whose extra words reach arg[-n..-2]
local COMBINED = H.lua == "lua5.4"
local INTERP = COMBINED and "-U,lua5.4" or ("-U " .. H.lua)

--- the wrapper's words before the script, with options (e.g. "-f")
local function interpwords (opts)
  if not opts or opts == "" then return INTERP end
  return COMBINED and (opts .. "," .. INTERP) or (opts .. " " .. INTERP)
end
local INTERP_ARGS = COMBINED and "-1=lua5.4" or nil

local function q (s) return "'" .. s:gsub("'", "'\\''") .. "'" end


-- {======================================================
-- Test directories, calls, cleanup
-- =======================================================

local dirs = {}

local function newdir ()
  local d = H.sh("mktemp -d /tmp/interp_spec.XXXXXX"):match("%S+")
  dirs[#dirs + 1] = d
  H.writefile(d .. "/t.lua", H.readfile(FIXTURE))
  return d
end


--- One call through Debian's wrapper: {rc, out, err}. o.input, o.env
-- ("K=V ..."), o.opts (wrapper options such as "-f"), o.timeout.
local function call (d, args, o)
  o = o or {}
  H.writefile(d .. "/.in", o.input or "")
  local cmd = ("cd %s && env %s timeout -k 2 %d %s %s t.lua %s <.in >.out 2>.err; echo $?")
    :format(q(d), o.env or "", o.timeout or 20, WRAPPER, interpwords(o.opts), args or "")
  local rc = tonumber(H.sh(cmd):match("%d+"))
  return {rc = rc, out = H.readfile(d .. "/.out") or "", err = H.readfile(d .. "/.err") or ""}
end


local function lines (path)
  local t = {}
  for l in (H.readfile(path) or ""):gmatch("[^\n]+") do t[#t + 1] = tonumber(l) or l end
  return t
end

--- the server pid the last call reported
local function server (d)
  local s = lines(d .. "/servers")
  return s[#s]
end


--- a server whose log goes to d/log.txt (env: more T_* settings): d,
-- the log's path, the server's pid
local function logserver (env)
  local d = newdir()
  local log = d .. "/log.txt"
  call(d, "end", {env = (env and env .. " " or "") .. "T_LOG=" .. log})
  return d, log, server(d)
end


--- the fds listed in an executor's "FDS ..." line, below 1000 (valgrind
-- keeps its own above), sorted, as a string
local function fdlist (out)
  local t = {}
  for fd in (out:match("FDS ([^\n]*)") or ""):gmatch("%d+") do
    if tonumber(fd) < 1000 then t[#t + 1] = tonumber(fd) end
  end
  table.sort(t)
  return table.concat(t, " ")
end


--- the executor's fds from 3 up, from its "FDL fd target flags" lines:
-- fd -> target, and the call's connection (a socket, close-on-exec: it
-- sends its status there itself), which must be there
local function extrafds (out)
  local t, call = {}, nil
  for fd, target, flags in out:gmatch("FDL (%d+) (%S+) (%d+)") do
    if tonumber(fd) < 1000 then
      t[tonumber(fd)] = target
      if target:match("^socket:") and tonumber(flags, 8) & tonumber("2000000", 8) ~= 0 then
        lu.assertNil(call, "one connection only")
        call = tonumber(fd)
      end
    end
  end
  lu.assertNotNil(call, "the call's connection: " .. out)
  return t, call
end


local function alive (pid)
  local st = H.pstate(pid)
  return st ~= nil and st ~= "Z"
end


--- pids of live processes whose cwd is d
local function procsin (d)
  local t = {}
  for pid, cwd in H.sh("ls -l /proc/[0-9]*/cwd 2>/dev/null"):gmatch("/proc/(%d+)/cwd %-> ([^\n]+)") do
    if cwd == d and alive(pid) then t[#t + 1] = tonumber(pid) end
  end
  table.sort(t)
  return t
end


--- reap a pid if it is our child (servers become ours: helpers make
-- this process a subreaper); bounded, and quiet if it is not
local function reap (pid)
  pcall(H.wait_until, function ()
    local got, how = prefork.wait(pid, "nohang")
    return got or how ~= "running"
  end, 5)
end


--- the path of the socket the server pid listens on (/proc/net/unix)
local function sockpath (pid)
  local inodes = {}
  for ino in H.sh("ls -l /proc/" .. pid .. "/fd 2>/dev/null"):gmatch("socket:%[(%d+)%]") do
    inodes[ino] = true
  end
  for line in io.lines("/proc/net/unix") do
    local ino, path = line:match("%s(%d+)%s+(/%S+)$")
    if ino and inodes[ino] and path:match("/s[0-9a-f]+$") then return path end
  end
end


local function cwdof (pid)
  return (H.sh("readlink /proc/" .. pid .. "/cwd 2>/dev/null"):gsub("\n$", ""))
end


--- is pid the server's spare executor (forked ahead, waiting for a call)?
local function isspare (pid)
  return (H.readfile("/proc/" .. pid .. "/comm") or ""):match("^spare executor") ~= nil
end

--- is pid the server's spare maker (the child that forks the spares)?
local function ismaker (pid)
  return (H.readfile("/proc/" .. pid .. "/comm") or ""):match("^spare maker") ~= nil
end


--- the executor pids (children of the server, but the spares and their
-- maker) that are alive
local function executors (s)
  local t = {}
  for _, pid in ipairs(H.childpids(s)) do
    if not isspare(pid) and not ismaker(pid) then t[#t + 1] = pid end
  end
  return t
end


--- the server's spare executors and its spare maker that are alive
local function spares (s)
  local t, m = {}, {}
  for _, pid in ipairs(H.childpids(s)) do
    if isspare(pid) then t[#t + 1] = pid end
    if ismaker(pid) then m[#m + 1] = pid end
  end
  return t, m
end


local function cleanup ()
  for _, d in ipairs(dirs) do
    local pids = procsin(d)
    for _, p in ipairs(lines(d .. "/servers")) do
      if cwdof(p) == d then pids[#pids + 1] = p end
    end
    for _, p in ipairs(lines(d .. "/execs")) do
      if cwdof(p) == d then pids[#pids + 1] = p end
    end
    for _, p in ipairs(pids) do H.kill(p, "KILL") end
    for _, p in ipairs(pids) do reap(p) end
    for _, p in ipairs(lines(d .. "/servers")) do reap(p) end  -- exited ones
    -- the socket and lock files of the idents used here
    H.sh(("cd %s && %s %s t.lua >/dev/null 2>&1; %s %s ex.lua >/dev/null 2>&1")
         :format(q(d), WRAPPER, interpwords("--kill"), WRAPPER, interpwords("--kill")))
    H.sh("rm -rf " .. q(d))
  end
  dirs = {}
  H.cleanup()
end

-- }======================================================


-- {======================================================
-- A fake client (LuaSocket's socket.unix and prefork's fd passing)
-- =======================================================

local function u32 (n)
  return string.char((n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255)
end

local function request (env, argv)
  local t = {}
  for _, e in ipairs(env) do t[#t + 1] = e .. "\0" end
  t[#t + 1] = "\0"
  for _, a in ipairs(argv) do t[#t + 1] = a .. "\0" end
  return table.concat(t)
end


--- Connect, read the greeting; c, greeting
local function fakeconnect (path)
  local c = assert(unix.stream())
  c:settimeout(10)
  assert(c:connect(path))
  local g = c:receive(8)
  return c, g
end


--- the three fds of a call: stdin /dev/null, stdout and stderr files
local function stdfiles (d)
  local i = assert(io.open("/dev/null"))
  local o = assert(io.open(d .. "/fake.out", "w"))
  local e = assert(io.open(d .. "/fake.err", "w"))
  return {i, o, e}
end


--- A whole call: greeting, the signalling byte, the fds, the request
-- (env: a list of its entries, or FOO=fake and PATH).
local function fakecall (path, d, argv, env)
  local c, g = fakeconnect(path)
  lu.assertEquals(g, "PFI\n\0\0\0\0")
  local files = stdfiles(d)
  assert(c:send("\0"))
  for _, f in ipairs(files) do assert(core.interp_sendfd(c:getfd(), f)) end
  for _, f in ipairs(files) do f:close() end
  local req = request(env or {"FOO=fake", "PATH=" .. os.getenv("PATH")}, argv)
  assert(c:send(u32(#req) .. req))
  return c
end


local function readstatus (c)
  local s, err = c:receive(4)
  if not s then return nil, err end
  local a, b, cc, dd = s:byte(1, 4)
  return (a << 24) | (b << 16) | (cc << 8) | dd
end


--- the server closes c without a status (a refused call)
local function assertclosed (c)
  c:settimeout(5)
  local s, err = c:receive(4)
  lu.assertNil(s)
  lu.assertEquals(err, "closed")
  c:close()
end

-- }======================================================


TestInterp = {}

function TestInterp:tearDown () cleanup() end


function TestInterp:test_stdio_args_env_of_the_caller ()
  local d = newdir()
  local r = call(d, "echo 3 a 'b c'", {input = "hello\nworld\n", env = "FOO=bar"})
  lu.assertEquals(r.rc, 3)
  lu.assertStrContains(r.out, "HELLO\nWORLD\n")
  lu.assertStrContains(r.out, "ENV FOO=bar PI=nil\n")
  local args = r.out:match("ARGS ([^\n]*)")
  lu.assertStrContains(args, "0=t.lua 1=echo 2=3 3=a 4=b c")
  if INTERP_ARGS then lu.assertStrContains(args, INTERP_ARGS) end
  lu.assertEquals(r.err:match("ERR to stderr\n"), "ERR to stderr\n")
  lu.assertStrContains(r.err, "INIT echo 3 a b c FOO=bar")  -- init's stdout: the first caller's stderr
  -- a second call: its own args and env; `...` keeps the first caller's
  r = call(d, "echo 0 x", {input = "again", env = "FOO=baz"})
  lu.assertEquals(r.rc, 0)
  lu.assertStrContains(r.out, "AGAIN")
  lu.assertStrContains(r.out, "ENV FOO=baz PI=nil\n")
  lu.assertStrContains(r.out, "1=echo 2=0 3=x")
  lu.assertNotStrContains(r.out, "3=a")
  lu.assertStrContains(r.out, "FIRST echo 3 a b c\n")
  lu.assertNotStrContains(r.err, "INIT")  -- no second initialisation
  lu.assertEquals(#lines(d .. "/servers"), 2)
  lu.assertEquals(lines(d .. "/servers")[1], lines(d .. "/servers")[2])
end


function TestInterp:test_exit_statuses_reach_the_caller ()
  local d = newdir()
  lu.assertEquals(call(d, "exit 7").rc, 7)
  lu.assertEquals(call(d, "exit 0").rc, 0)
  lu.assertEquals(call(d, "closeexit 6").rc, 6)  -- os.exit(6, true): the state is closed
  local w = call(d, "warn")
  lu.assertEquals({w.rc, w.out}, {0, "ok\n"})
  lu.assertStrContains(w.err, "Lua warning: a warning")
  local r = call(d, "end")
  lu.assertEquals({r.rc, r.out}, {0, "ok\n"})
  r = call(d, "error")
  lu.assertEquals(r.rc, 1)
  lu.assertStrContains(r.err, "boom from the executor")
  lu.assertStrContains(r.err, "stack traceback")
  lu.assertStrMatches(r.err, "^[^\n]*lua5%.4: t%.lua:%d+: boom.*")
  lu.assertEquals(call(d, "kill TERM").rc, 128 + 15)  -- the wrapper re-raises
  lu.assertEquals(call(d, "kill INT").rc, 128 + 2)
  r = call(d, "kill SEGV")
  lu.assertEquals(r.rc, 127)
  lu.assertStrContains(r.err, "invocation failed due to signal 11")
  lu.assertEquals(#lines(d .. "/servers"), 9)
  for _, s in ipairs(lines(d .. "/servers")) do lu.assertEquals(s, server(d)) end
end


function TestInterp:test_a_client_that_got_its_status_interrupts_nothing ()
  -- the executor answers its client itself and ends; the client then ends
  -- too, and that end of stream is no interruption: a child the call left
  -- in its group gets no SIGINT
  local d = newdir()
  call(d, "end")
  for i = 1, 3 do
    lu.assertEquals(call(d, "bg " .. i).rc, 0)
    H.wait_until(function () return H.readfile(d .. "/bgdone." .. i) end, 10, "the child's second")
    lu.assertNil(H.readfile(d .. "/bgint." .. i), "a SIGINT after the answer")
  end
end


function TestInterp:test_a_script_that_closes_its_connection_still_gets_its_status ()
  -- the executor sends its status on its copy of the call's connection;
  -- this one closed it and opened a file that took its number: the
  -- server answers, and the file gets nothing
  local d = newdir()
  call(d, "end")
  local r = call(d, "closecall 5")
  lu.assertEquals(r.rc, 5)
  local closed = r.out:match("CLOSED (%d+)")
  lu.assertNotNil(closed, r.out)
  lu.assertStrContains(r.out, "FDL " .. closed .. " " .. d .. "/taken.txt")
  lu.assertEquals(H.readfile(d .. "/taken.txt"), "")
  lu.assertEquals(call(d, "exit 3").rc, 3)  -- the server serves on
end


function TestInterp:test_the_executor_has_fds_0_1_2_default_signals_its_own_group ()
  local d = newdir()
  call(d, "end")
  local r = call(d, "fds")
  lu.assertEquals(r.rc, 0)
  local _, conn = extrafds(r.out)
  lu.assertEquals(fdlist(r.out), "0 1 2 " .. conn)  -- and no other
  -- (signals 32 and 33 are glibc's own: only 1..31 are ours to reset)
  -- (valgrind catches every signal itself: SigCgt is its own there)
  for _, what in ipairs(H.valgrind and {"SIGIGN", "SIGBLK"} or {"SIGIGN", "SIGCGT", "SIGBLK"}) do
    lu.assertEquals(tonumber(r.out:match(what .. " (%x+)"), 16) & 0x7fffffff, 0, what)
  end
  local pid, pgid, srv = r.out:match("PID (%d+) PGID (%d+) SERVER (%d+)")
  lu.assertEquals(pgid, pid)
  lu.assertNotEquals(srv, pid)
  -- the server is a session leader with its fds 0, 1, 2 on /dev/null
  local s = H.readfile("/proc/" .. srv .. "/stat")
  local spgid, ssid = s:match("%) %a %d+ (%d+) (%d+)")
  lu.assertEquals({spgid, ssid}, {srv, srv})
  lu.assertEquals(H.sh("readlink /proc/" .. srv .. "/fd/1"), "/dev/null\n")
  if not H.valgrind then  -- (under valgrind argv is the tool's: no titles)
    lu.assertStrContains(H.cmdline(srv), "t.lua [server]")
  end
end


function TestInterp:test_keep_fds_keeps_a_file_of_the_initialisation ()
  local d = newdir()
  call(d, "end", {env = "T_KEEP=1"})
  local r = call(d, "keep")
  lu.assertEquals(r.rc, 0)
  local extra, conn = extrafds(r.out)
  local kept
  for fd, target in pairs(extra) do if target:match("/kept%.txt$") then kept = fd end end
  lu.assertNotNil(kept, r.out)
  local want = {0, 1, 2, kept, conn}  -- the kept one, the call's, nothing else
  table.sort(want)
  lu.assertEquals(fdlist(r.out), table.concat(want, " "))
  lu.assertStrMatches(H.readfile(d .. "/kept.txt"), "written by %d+\n")
end


function TestInterp:test_keep_fds_must_be_open ()
  local d = newdir()
  local r = call(d, "end", {env = "T_KEEPCLOSED=1"})
  lu.assertNotEquals(r.rc, 0)
  lu.assertStrContains(r.err, "keep_fds: fd 999 is not open")
end


function TestInterp:test_many_calls_one_server ()
  local d = newdir()
  for i = 1, 30 do
    local r = call(d, "echo " .. (i % 5), {input = "n" .. i})
    lu.assertEquals(r.rc, i % 5)
    lu.assertStrContains(r.out, "N" .. i)
  end
  local servers, execs = lines(d .. "/servers"), lines(d .. "/execs")
  for _, s in ipairs(servers) do lu.assertEquals(s, servers[1]) end
  local seen = {}
  for _, e in ipairs(execs) do seen[e] = true end
  lu.assertEquals(H.count(seen), 30)
  -- every executor is gone and reaped, no fd growth in the server
  H.wait_until(function () return #executors(servers[1]) == 0 end, 5, "no executors")
  local n = H.fdcount(servers[1])
  call(d, "end")
  H.wait_until(function () return H.fdcount(servers[1]) == n end, 5, "the server's fds back to " .. n)
end


function TestInterp:test_a_spare_executor_takes_the_next_call ()
  local d, log, s = logserver()
  -- between calls: spare executors wait, their maker too, and no other child
  H.wait_until(function () return #spares(s) >= 1 and #executors(s) == 0 end, 5, "a spare")
  local sp, maker = spares(s)
  lu.assertEquals(#maker, 1, "the spare maker")
  lu.assertEquals(#H.childpids(s), #sp + 1)
  if not H.valgrind then
    lu.assertStrContains(H.cmdline(sp[1]), "t.lua [spare]")
    lu.assertStrContains(H.cmdline(maker[1]), "t.lua [spare maker]")
  end
  local waiting = {}
  for _, p in ipairs(sp) do waiting[p] = true end
  -- the next call runs in one of them, as any executor
  local r = call(d, "fds")
  lu.assertEquals(r.rc, 0)
  local pid = tonumber(r.out:match("PID (%d+)"))
  lu.assertTrue(waiting[pid], "the call ran in a spare")
  lu.assertEquals(tonumber(r.out:match("PGID (%d+)")), pid)
  lu.assertEquals(tonumber(r.out:match("SERVER (%d+)")), s)  -- a child of the server
  local _, conn = extrafds(r.out)
  lu.assertEquals(fdlist(r.out), "0 1 2 " .. conn)
  H.wait_until(function ()
    for _, p in ipairs(spares(s)) do if not waiting[p] then return true end end
  end, 5, "a new spare")
  -- a signal sent to a waiting spare acts there, not on the next call
  local one = spares(s)[1]
  H.kill(one, "TERM")
  H.wait_until(function () return not alive(one) end, 5, "the TERMed spare reaped")
  r = call(d, "echo 2", {input = "next"})
  lu.assertEquals(r.rc, 2)
  lu.assertStrContains(r.out, "NEXT")
  lu.assertNotEquals(tonumber(r.out:match("PID (%d+)")), one)
  H.wait_until(function () return #spares(s) >= 1 end, 5, "a spare again")
  -- a spare that dies: the next call is served all the same, then a new spare
  one = spares(s)[1]
  H.kill(one, "KILL")
  H.wait_until(function () return not alive(one) end, 5, "the killed spare reaped")
  r = call(d, "echo 3", {input = "after"})
  lu.assertEquals(r.rc, 3)
  lu.assertStrContains(r.out, "AFTER")
  H.wait_until(function () return #spares(s) >= 1 end, 5, "a spare again")
  H.wait_until(function () return (H.readfile(log) or ""):find("spare executor " .. one .. ": status 9", 1, true) end,
               5, "the killed spare logged")
  -- the spares and their maker go with the server
  local left, m = spares(s)
  left[#left + 1] = m[1]
  H.sh(("cd %s && %s %s t.lua"):format(q(d), WRAPPER, interpwords("--kill")))
  H.wait_until(function ()
    for _, p in ipairs(left) do if alive(p) then return false end end
    return not alive(s)
  end, 5, "the server, its spares and their maker gone")
  for _, p in ipairs(left) do reap(p) end
  reap(s)
end


function TestInterp:test_a_killed_spare_maker_comes_back ()
  local d, log, s = logserver()
  H.wait_until(function () local _, m = spares(s) return #m == 1 end, 5, "the spare maker")
  local _, m = spares(s)
  H.kill(m[1], "KILL")
  H.wait_until(function () return not alive(m[1]) end, 5, "the maker reaped")
  H.wait_until(function () return (H.readfile(log) or ""):find("spare maker " .. m[1] .. ": status 9", 1, true) end,
               5, "the maker's death logged")
  -- calls go on (a waiting spare, or a fork of their own), and a new maker comes
  for i = 1, 3 do
    local r = call(d, "echo " .. i, {input = "m" .. i})
    lu.assertEquals(r.rc, i)
    lu.assertStrContains(r.out, "M" .. i)
  end
  H.wait_until(function ()
    call(d, "end")
    local _, m2 = spares(s)
    return #m2 == 1 and m2[1] ~= m[1]
  end, 10, "a new spare maker")
  lu.assertEquals(server(d), s)
end


--- n calls of args at once (Debian's wrapper), waited for
local function parallel (d, n, args, envs)
  H.sh(("cd %s && for i in $(seq %d); do env %s timeout 20 %s %s t.lua %s </dev/null >out.$i 2>&1 & done; wait")
       :format(q(d), n, envs or "", WRAPPER, INTERP, args))
end

--- the peaks the calls of "peak" wrote: how many ran at once, each saw
local function peaks (d)
  local t = {}
  for f in H.sh("cd " .. q(d) .. " && ls peak.* 2>/dev/null"):gmatch("%S+") do
    t[#t + 1] = tonumber(H.readfile(d .. "/" .. f))
  end
  table.sort(t)
  return t
end


function TestInterp:test_concurrent_callers_and_the_max_servers_queue ()
  local d = newdir()
  call(d, "end", {env = "T_MAX=2"})
  -- 2 at a time: each call waits (up to 0.5 s) for a third that never
  -- comes while the limit holds
  parallel(d, 4, "peak 3 0.5")
  local p = peaks(d)
  local outs = {}
  for i = 1, 4 do outs[i] = ("out.%d: %s"):format(i, H.readfile(d .. "/out." .. i) or "none") end
  lu.assertEquals(#p, 4, table.concat(outs, "\n"))
  lu.assertEquals(p[4], 2)  -- never more than two, and two at once
  for i = 1, 4 do lu.assertStrMatches(H.readfile(d .. "/out." .. i), ".*PEAK [12]\n.*") end
  -- 8 at a time: the four all run at once (each waits for the others)
  local d2 = newdir()
  call(d2, "end", {env = "T_MAX=8"})
  parallel(d2, 4, "meet 4 15")
  lu.assertEquals(peaks(d2), {4, 4, 4, 4})
  for i = 1, 4 do lu.assertStrContains(H.readfile(d2 .. "/out." .. i), "PEAK 4") end
  lu.assertEquals(#lines(d2 .. "/servers"), 5)
  for _, s in ipairs(lines(d2 .. "/servers")) do lu.assertEquals(s, server(d2)) end
end


function TestInterp:test_idle_timeout ()
  local d = newdir()
  call(d, "end", {env = "T_IDLE=0.5"})
  local s = server(d)
  H.wait_until(function () return not alive(s) end, 5, "the idle server to quit")
  reap(s)
  local r = call(d, "end", {env = "T_IDLE=0.5"})
  lu.assertEquals(r.rc, 0)
  lu.assertNotEquals(server(d), s)
  -- a call in progress is not idleness
  local s2 = server(d)
  r = call(d, "sleep 1")
  lu.assertStrContains(r.out, "SLEPT")
  lu.assertEquals(server(d), s2)
end


--- an mtime just newer than the server's (its socket's), whatever the
-- clock's granularity: no wait for it to move on
local function touch (path, s)
  local sock = assert(sockpath(s), "the server's socket")
  local sec, nsec = H.sh("stat -c %.9Y " .. q(sock)):match("(%d+)%.(%d+)")
  nsec = tonumber(nsec) + 1000
  H.sh(("touch -d @%d.%09d %s"):format(tonumber(sec) + nsec // 1000000000,
       nsec % 1000000000, q(path)))
end


function TestInterp:test_autoreload_on_a_newer_script ()
  local d = newdir()
  call(d, "end")
  local s = server(d)
  lu.assertEquals(call(d, "end").rc, 0)
  lu.assertEquals(server(d), s)
  touch(d .. "/t.lua", s)
  local r = call(d, "end")
  lu.assertEquals({r.rc, r.out}, {0, "ok\n"})
  lu.assertNotEquals(server(d), s)
  H.wait_until(function () return not alive(s) end, 5, "the old server to quit")
end


function TestInterp:test_autoreload_on_a_newer_module_extra_and_also_check ()
  local d = newdir()
  H.writefile(d .. "/mymod.lua", "return {}\n")
  H.writefile(d .. "/extra.txt", "")
  H.writefile(d .. "/also.txt", "")
  local env = "T_REQUIRE=mymod T_EXTRA=extra.txt T_ALSO=also.txt LUA_PATH=" ..
              q("./?.lua;" .. os.getenv("LUA_PATH"))
  for _, f in ipairs{"mymod.lua", "extra.txt", "also.txt"} do
    call(d, "end", {env = env})
    local s = server(d)
    lu.assertEquals(call(d, "end", {env = env}).rc, 0)
    lu.assertEquals(server(d), s, f)
    touch(d .. "/" .. f, s)
    lu.assertEquals(call(d, "end", {env = env}).rc, 0)
    lu.assertNotEquals(server(d), s, f .. " did not reload")
  end
  -- a file that goes missing is no reason to reload
  local s = server(d)
  os.remove(d .. "/extra.txt")
  lu.assertEquals(call(d, "end", {env = env}).rc, 0)
  lu.assertEquals(server(d), s)
end


function TestInterp:test_fresh_and_kill_options ()
  local d = newdir()
  call(d, "end")
  local s = server(d)
  local r = call(d, "end", {opts = "-f"})
  lu.assertEquals(r.rc, 0)
  local s2 = server(d)
  lu.assertNotEquals(s2, s)
  H.wait_until(function () return not alive(s) end, 5, "the replaced server to quit")
  r = call(d, "end", {opts = "--kill"})
  lu.assertEquals(r.rc, 0)
  lu.assertEquals(r.out, "")
  H.wait_until(function () return not alive(s2) end, 5, "the killed server to quit")
  lu.assertEquals(call(d, "end").rc, 0)
  lu.assertNotEquals(server(d), s2)
end


function TestInterp:test_a_stale_socket_after_kill_9 ()
  local d = newdir()
  call(d, "end")
  local s = server(d)
  H.kill(s, "KILL")
  H.wait_until(function () return not alive(s) end, 5, "the server to die")
  reap(s)
  local r = call(d, "echo 4", {input = "x"})
  lu.assertEquals(r.rc, 4)
  lu.assertStrContains(r.out, "X")
  lu.assertNotEquals(server(d), s)
end


function TestInterp:test_a_plain_exit_is_never_reported_as_sigint ()
  local d = newdir()
  call(d, "end")
  local rcs = H.sh(("cd %s && for i in $(seq 50); do %s %s t.lua end >/dev/null 2>&1; echo $?; done")
                   :format(q(d), WRAPPER, INTERP))
  local n = 0
  for rc in rcs:gmatch("%d+") do
    lu.assertEquals(rc, "0")
    n = n + 1
  end
  lu.assertEquals(n, 50)
end


function TestInterp:test_a_killed_client_interrupts_its_executor ()
  local d = newdir()
  call(d, "end")
  local s = server(d)
  local p = H.spawn(("env -C %s %s %s t.lua trap INT INT"):format(q(d), WRAPPER, INTERP))
  H.wait_until(function () return H.readfile(d .. "/ready") end, 10, "the executor's shell")
  H.wait_until(function () return #executors(s) == 1 end, 5, "one executor")  -- (and no earlier one)
  p:kill("KILL")
  p:wait(5)
  H.wait_until(function () return H.readfile(d .. "/INT") end, 5, "SIGINT in the executor's group")
  H.wait_until(function () return #executors(s) == 0 end, 5, "the executor to go")
  -- nothing of that call is left: only the server and the wrapper's watcher
  H.wait_until(function ()
    local left = {}
    for _, pid in ipairs(procsin(d)) do
      if pid ~= s and not isspare(pid) and not ismaker(pid)
         and not H.cmdline(pid):match("^%S*prefork%-interp ") then
        left[#left + 1] = pid
      end
    end
    return #left == 0
  end, 5, "no process of the call left")
  lu.assertEquals(call(d, "end").rc, 0)
end


function TestInterp:test_signal_bytes_reach_the_executors_group ()
  local d = newdir()
  call(d, "end")
  local s = server(d)
  local path = assert(sockpath(s), "the server's socket")
  for _, sig in ipairs{"INT", "TERM", "HUP", "QUIT", "USR1", "USR2"} do
    os.remove(d .. "/ready")
    local c = fakecall(path, d, {"lua5.4", "t.lua", "sleep", "10"})
    H.wait_until(function () return (H.readfile(d .. "/fake.out") or ""):match("STARTED") end, 10, "the executor")
    assert(c:send(string.char(9)))  -- KILL is not forwarded
    local num = ({INT = 2, TERM = 15, HUP = 1, QUIT = 3, USR1 = 10, USR2 = 12})[sig]
    assert(c:send(string.char(num)))
    local st = readstatus(c)
    lu.assertEquals(st & 0x7f, num, sig)  -- died of it (QUIT may add the core bit)
    c:close()
  end
  -- WINCH does not kill: a shell in the group traps it
  os.remove(d .. "/ready")
  local c = fakecall(path, d, {"lua5.4", "t.lua", "trap", "WINCH", "WINCH"})
  H.wait_until(function () return H.readfile(d .. "/ready") end, 10, "the trap")
  assert(c:send(string.char(28)))
  lu.assertEquals(readstatus(c), 7 << 8)
  lu.assertEquals(H.readfile(d .. "/WINCH"), "WINCH\n")
  c:close()
  -- EOF: the client went away; SIGINT to the group
  os.remove(d .. "/ready")
  c = fakecall(path, d, {"lua5.4", "t.lua", "trap", "INT", "INT"})
  H.wait_until(function () return H.readfile(d .. "/ready") end, 10, "the trap")
  c:close()
  H.wait_until(function () return H.readfile(d .. "/INT") end, 5, "SIGINT after EOF")
  H.wait_until(function () return #executors(s) == 0 end, 5, "the executors to go")
  lu.assertEquals(server(d), s)
end


local function body (s) return u32(#s) .. s end

function TestInterp:test_interpreter_flags_before_the_script ()
  local d = newdir()
  call(d, "end")
  local path = assert(sockpath(server(d)))
  local c = fakecall(path, d, {"lua5.4", "-W", "t.lua", "echo", "9", "x"})
  lu.assertEquals(readstatus(c), 9 << 8)
  c:close()
  local out = H.readfile(d .. "/fake.out")
  lu.assertStrContains(out, "ARGS -2=lua5.4 -1=-W 0=t.lua 1=echo 2=9 3=x\n")
  lu.assertStrContains(out, "ENV FOO=fake PI=nil\n")
  lu.assertStrContains(H.readfile(d .. "/fake.err"), "ERR to stderr")
end


function TestInterp:test_the_environment_is_the_requests ()
  local d = newdir()
  call(d, "end")
  local path = assert(sockpath(server(d)))
  local c = fakecall(path, d, {"lua5.4", "t.lua", "env"}, {"FOO=one", "PREFORK_INTERP=x",
    "PATH=" .. os.getenv("PATH"), "BAR=b=c", "PREFORK_INTERPX=y", "FOO=two"})
  lu.assertEquals(readstatus(c), 0)
  c:close()
  -- a later entry of a name replaces an earlier one, PREFORK_INTERP goes
  lu.assertStrContains(H.readfile(d .. "/fake.out"), "ENV FOO=two PI=nil\n")
  local seen = {}  -- what a child of the executor gets
  for line in (H.readfile(d .. "/env.txt") or ""):gmatch("[^\n]+") do
    seen[line] = true
  end
  lu.assertTrue(seen["FOO=two"] and seen["BAR=b=c"] and seen["PREFORK_INTERPX=y"], H.readfile(d .. "/env.txt"))
  lu.assertNil(seen["FOO=one"])
  lu.assertNil(seen["PREFORK_INTERP=x"])
end


local BAD = {
  {"wrong signalling byte", "\1"},
  {"a message without an fd", "\0", 0, "\0"},
  {"fewer than 3 fds", "\0", 2, "x"},
  {"an oversize length", "\0", 3, u32(core.interp_maxreq + 1)},
  {"a request without its final NUL", "\0", 3, body("A=b\0\0lua")},
  {"no end of the environment", "\0", 3, body("A=b\0C=d\0")},
  {"an environment entry without '='", "\0", 3, body("Ab\0\0lua5.4\0")},
  {"no argv", "\0", 3, body("A=b\0\0")},
  {"a truncated request", "\0", 3, u32(100) .. "A=b\0\0", true},
}


function TestInterp:test_bad_input_fails_that_call_only ()
  local d, log, s = logserver()
  local path = assert(sockpath(s))
  local nfd = H.fdcount(s)
  for _, b in ipairs(BAD) do
    local what, first, nfds, rest, half = b[1], b[2], b[3], b[4], b[5]
    local nexecs = #lines(d .. "/execs")
    local c, g = fakeconnect(path)
    lu.assertEquals(g, "PFI\n\0\0\0\0")
    assert(c:send(first))
    local files = stdfiles(d)
    for i = 1, nfds or 0 do assert(core.interp_sendfd(c:getfd(), files[i])) end
    for _, f in ipairs(files) do f:close() end
    if rest then assert(c:send(rest)) end
    if half then c:shutdown("send") end
    local ok, e = pcall(assertclosed, c)
    if not ok then io.stderr:write(what, "\n", H.readfile(log) or "", H.sh("ls -l /proc/" .. s .. "/fd")) error(e) end
    -- no executor ran (the last call's may still be leaving: its status
    -- came before its exit)
    lu.assertEquals(#lines(d .. "/execs"), nexecs, what)
    H.wait_until(function () return #executors(s) == 0 end, 5, "no executor")
    -- the server goes on serving
    local r = call(d, "echo 0", {input = "still"})
    lu.assertEquals(r.rc, 0, what)
    lu.assertStrContains(r.out, "STILL")
    lu.assertEquals(server(d), s)
  end
  H.wait_until(function () return H.fdcount(s) == nfd end, 5, "the server's fds back to " .. nfd)
  local l = H.readfile(log) or ""
  for _, m in ipairs{"bad signalling byte", "a message without an fd", "request too long",
                     "request not NUL%-terminated", "no end of the environment",
                     "environment entry without '='", "no argv", "end of stream in the request"} do
    lu.assertStrMatches(l, ".*call: " .. m .. ".*")
  end
end


function TestInterp:test_idle_connections_hold_no_server_slot ()
  local d, log, s = logserver("T_MAX=4")
  local path = assert(sockpath(s))
  local idle = {}
  for i = 1, 4 do  -- as many as max_servers: greeted, and never a request
    local c, g = fakeconnect(path)
    lu.assertEquals(g, "PFI\n\0\0\0\0")
    idle[i] = c
  end
  -- a real call goes through all the same, at once (before, it waited 30 s)
  local r = call(d, "echo 3", {input = "busy", timeout = 10})
  lu.assertEquals(r.rc, 3)
  lu.assertStrContains(r.out, "BUSY")
  -- the idle ones are closed at their deadline, and logged
  for _, c in ipairs(idle) do assertclosed(c) end
  H.wait_until(function ()
    local _, n = (H.readfile(log) or ""):gsub("call: no complete request within 2 s %(client pid %d+%): closed", "")
    return n == 4
  end, 5, "the four logged")
  lu.assertEquals(server(d), s)
end


function TestInterp:test_max_errors_is_counted ()
  local d, log, s = logserver("T_MAXERR=2")
  local path = assert(sockpath(s))
  for _ = 1, 3 do
    local c = fakeconnect(path)
    assert(c:send("\1"))
    assertclosed(c)
  end
  H.wait_until(function () return not alive(s) end, 5, "the server to give up")
  lu.assertStrContains(H.readfile(log), "too many errors (3), quitting")
  lu.assertEquals(call(d, "end").rc, 0)
  lu.assertNotEquals(server(d), s)
end


function TestInterp:test_a_peer_of_another_uid_is_refused ()
  local uid = tonumber(H.sh("id -u"))
  if uid ~= 0 or H.sh("command -v setpriv") == "" then
    lu.skip("needs root and setpriv to connect as nobody")
  end
  local d, log, s = logserver()
  local path = assert(sockpath(s))
  -- nobody, with the capability to pass the 0700 run directory
  local out = H.sh(("setpriv --reuid=65534 --regid=65534 --clear-groups " ..
    "--inh-caps=+dac_read_search,+dac_override --ambient-caps=+dac_read_search,+dac_override " ..
    "%s -e %s 2>&1"):format(H.lua:gsub("^env ", "env "), q(([[
      local u = require "socket.unix"
      local c = assert(u.stream())
      c:settimeout(5)
      assert(c:connect(%q))
      print("UID", io.popen("id -u"):read("l"), "GOT", c:receive(8))]]):format(path))))
  lu.assertStrContains(out, "UID\t65534\tGOT\tnil\tclosed")
  lu.assertStrContains(H.readfile(log), "refused a connection from uid 65534")
  H.wait_until(function () return #executors(s) == 0 end, 5, "no executor")
  lu.assertEquals(call(d, "end").rc, 0)
  lu.assertEquals(server(d), s)
end


function TestInterp:test_standalone_is_a_no_op ()
  local d = newdir()
  local out = H.sh(("cd %s && echo hi | FOO=solo %s t.lua echo 5 z; echo rc=$?"):format(q(d), H.lua))
  lu.assertStrContains(out, "INIT echo 5 z FOO=solo")
  lu.assertStrContains(out, "ARGS ")
  lu.assertStrContains(out, "0=t.lua 1=echo 2=5 3=z")
  lu.assertStrContains(out, "HI\n")
  lu.assertStrContains(out, "rc=5")
  local pid = out:match("PID (%d+) SERVER")
  lu.assertNil(H.pstate(pid))  -- it was the process itself
end


function TestInterp:test_malformed_prefork_interp_is_a_clear_error ()
  local d = newdir()
  for _, v in ipairs{"garbage", "v2,1.000000000 3,4,5,6", "v1,1.000000000 3,4,5",
                     "v1,1.5 3,4,5,6", "v1,1.000000000 900,901,902,903"} do
    local out = H.sh(("cd %s && PREFORK_INTERP=%s %s t.lua end 2>&1; echo rc=$?"):format(q(d), q(v), H.lua))
    lu.assertStrContains(out, "PREFORK_INTERP", v)
    lu.assertStrContains(out, "rc=1", v)
    lu.assertNotStrContains(out, "ok\n", v)
  end
end


function TestInterp:test_misuse_raises ()
  local interp = require "prefork.interp"
  lu.assertErrorMsgContains("option 'max_servers' must be an integer",
    interp.initialisation_complete, {max_servers = "4"})
  lu.assertErrorMsgContains("unknown option 'max_server'",
    interp.initialisation_complete, {max_server = 4})
  lu.assertErrorMsgContains("table expected", interp.initialisation_complete, 4)
  lu.assertErrorMsgContains("string expected", interp.autoreload_also_check, "a", 3)
  lu.assertNil(interp.initialisation_complete{max_servers = 2})  -- standalone here
end


function TestInterp:test_the_wire_parsers ()
  lu.assertEquals(core.interp_greeting(), "PFI\n\0\0\0\0")
  local e = core.interp_parseenv("v1,1795415264.455452110 5,9,7,8")
  lu.assertEquals(e, {sec = 1795415264, nsec = 455452110, fds = {5, 9, 7, 8}})
  e = core.interp_parseenv("v1,1.000000001,future 5,9,7,8,10 more words")
  lu.assertEquals(e, {sec = 1, nsec = 1, fds = {5, 9, 7, 8}})
  for _, bad in ipairs{"", "v1", "v1,", "v1,1.1 5,9,7,8", "v1,x.000000000 5,9,7,8",
                       "v2,1.000000000 5,9,7,8", "v1,1.000000000", "v1,1.000000000 5,9,7",
                       "v1,1.000000000 5,9,7,x", "v1,1.000000000 5,9,7,99999999999",
                       "v10,1.000000000 5,9,7,8", "v1,1.0000000000 5,9,7,8"} do
    lu.assertNil(core.interp_parseenv(bad), bad)
  end
  local env, argv = core.interp_parsereq("A=1\0B=x=y\0\0lua5.4\0s.lua\0\0arg\0")
  lu.assertEquals(env, {"A=1", "B=x=y"})
  lu.assertEquals(argv, {"lua5.4", "s.lua", "", "arg"})
  env, argv = core.interp_parsereq("\0lua5.4\0")
  lu.assertEquals({env, argv}, {{}, {"lua5.4"}})
  local cases = {
    [""] = "request not NUL-terminated", ["A=1\0\0x"] = "request not NUL-terminated",
    ["A=1\0"] = "no end of the environment", ["A\0\0x\0"] = "environment entry without '='",
    ["A=1\0\0"] = "no argv", [("x"):rep(core.interp_maxreq) .. "\0"] = "request too long",
  }
  for input, msg in pairs(cases) do
    lu.assertEquals({core.interp_parsereq(input)}, {nil, msg})
  end
  -- arg from a request's argv
  local interp = require "prefork.interp"
  lu.assertEquals(interp._makearg({"lua5.4", "s.lua", "a"}, "s.lua"), {[-1] = "lua5.4", [0] = "s.lua", "a"})
  lu.assertEquals(interp._makearg({"lua5.4", "-W", "s.lua", "s.lua"}, "s.lua"),
                  {[-2] = "lua5.4", [-1] = "-W", [0] = "s.lua", "s.lua"})
  lu.assertEquals(interp._makearg({"lua5.4", "other.lua", "a"}, "s.lua"),
                  {[-1] = "lua5.4", [0] = "other.lua", "a"})
end


function TestInterp:test_the_example_script ()
  local d = newdir()
  H.sh("cp " .. q(ROOT .. "/examples/interp.lua") .. " " .. q(d .. "/ex.lua"))
  local function run ()
    H.writefile(d .. "/.in", "")
    -- (to a file: a server under valgrind keeps a copy of its first stderr)
    H.sh(("cd %s && %s %s ex.lua one two <.in >.out 2>&1; echo rc=$? >>.out"):format(q(d), WRAPPER, INTERP))
    return H.readfile(d .. "/.out")
  end
  local out = run()
  lu.assertStrContains(out, "rc=0")
  lu.assertStrContains(out, "one two")
  local s = tonumber(out:match("server (%d+)"))
  local out2 = run()
  lu.assertStrContains(out2, "rc=0")
  -- warm: a fork of the server the cold call started, which stays (its
  -- initialisation is not run again)
  lu.assertEquals(tonumber(out2:match("server (%d+)")), s)
  lu.assertNotEquals(out2:match("pid (%d+)"), out:match("pid (%d+)"))
  lu.assertTrue(alive(s))
  lu.assertStrContains(out2, "200000 words ready")
end


-- {======================================================
-- Our own client, build/lua-prefork, against our server: what neither
-- Debian's wrapper nor Perl's server can show
-- =======================================================

local CLIENT = os.getenv("LUA_PREFORK_CLIENT") or (ROOT .. "/build/lua-prefork")
-- the interpreter as our client's combined #! word, whatever SPEC_LUA is
local OURWORD = "-U," .. H.lua:gsub("%s+", ",")
-- the plain form runs lua5.4 itself: under the sanitizers it needs their
-- runtime preloaded (under valgrind it runs without the tool)
local PLAINENV = H.lua:match("^env (LD_PRELOAD=%S+) ") or ""

--- Start `lua-prefork [words] t.lua args` in d, in the background: the
-- process (its pid is the client's own: sh execs it).
local function ourcall (d, args, words)
  return H.spawn("sh -c " .. q(("cd %s && exec %s %s t.lua %s"):format(q(d), CLIENT,
                 words or (COMBINED and "" or ("-U " .. H.lua)), args)))
end

TestOurClient = {}
function TestOurClient:tearDown ()
  for _, d in ipairs(dirs) do
    H.sh(("cd %s && %s --kill %s t.lua >/dev/null 2>&1"):format(q(d), CLIENT,
         COMBINED and "" or ("-U " .. H.lua)))
  end
  cleanup()
end

function TestOurClient:test_stdio_args_and_status ()
  local d = newdir()
  H.writefile(d .. "/.in", "quiet words\n")
  local rc = tonumber(H.sh(("cd %s && env %s FOO=ours %s t.lua echo 5 a <.in >.out 2>.err; echo $?")
                          :format(q(d), PLAINENV, CLIENT)):match("%d+"))
  lu.assertEquals(rc, 5)
  local out = H.readfile(d .. "/.out")
  lu.assertStrContains(out, "ARGS -1=lua5.4 0=t.lua 1=echo 2=5 3=a\n")
  lu.assertStrContains(out, "ENV FOO=ours PI=nil\n")
  lu.assertStrContains(out, "QUIET WORDS\n")
  lu.assertStrContains(H.readfile(d .. "/.err"), "ERR to stderr")
  H.sh(("cd %s && env %s %s --kill t.lua"):format(q(d), PLAINENV, CLIENT))
end

function TestOurClient:test_signals_to_the_caller_reach_the_executor ()
  local d = newdir()
  local p = ourcall(d, "end")
  p:wait(30)
  for _, sig in ipairs{"INT", "TERM", "HUP", "QUIT", "USR1", "USR2", "WINCH"} do
    os.remove(d .. "/ready")
    os.remove(d .. "/" .. sig)
    local c = ourcall(d, "trap " .. sig .. " " .. sig)
    H.wait_until(function () return H.readfile(d .. "/ready") end, 10, "the trap")
    c:kill(sig)
    local how, code = c:wait(10)
    -- the Lua executor ignores INT and QUIT while os.execute waits, and
    -- WINCH by default: it exits with the trap's status (on INT and QUIT
    -- dash kills itself with the signal after its trap, which os.exit
    -- reports as its number);
    -- the others kill it, and the caller dies of the same signal
    if how == "exit" then
      lu.assertTrue(sig == "INT" or sig == "QUIT" or sig == "WINCH", sig)
      local num = ({INT = 2, QUIT = 3})[sig]
      lu.assertEquals(code, code == num and num or 7, sig)
    else
      lu.assertEquals(prefork.signame(code), sig)
    end
    -- the shell's trap runs once its sleep of the moment ends: when the
    -- signal killed the executor (and the caller) at once, a little later
    local got = H.wait_until(function ()
      local s = H.readfile(d .. "/" .. sig)
      return s and s:find("\n") and s  -- (written whole: a line)
    end, 10, "the trap's record of " .. sig)
    lu.assertEquals(got, sig .. "\n")
  end
end

function TestOurClient:test_the_caller_dies_of_the_executors_signal ()
  local d = newdir()
  -- (a SEGV sent by kill is the executor's to die of, not ASan's to report)
  local asan = os.getenv("ASAN_OPTIONS")
  if asan then
    H.sh(("cd %s && env ASAN_OPTIONS=%s:handle_segv=0 %s %s t.lua end")
         :format(q(d), asan, CLIENT, "-U " .. H.lua))
  end
  for _, sig in ipairs{"USR1", "TERM", "SEGV"} do
    local c = ourcall(d, "kill " .. sig)
    local how, code = c:wait(20)
    lu.assertEquals(how, "signal", sig)
    lu.assertEquals(prefork.signame(code), sig)
  end
  -- a signal that does not kill: the executor ends normally
  local c = ourcall(d, "kill WINCH")
  lu.assertEquals({c:wait(20)}, {"exit", 0})
end

function TestOurClient:test_interpreter_flags_in_the_combined_word ()
  local d = newdir()
  local rc = tonumber(H.sh(("cd %s && %s %s,-W t.lua echo 0 z </dev/null >.out 2>.err; echo $?")
                          :format(q(d), CLIENT, OURWORD)):match("%d+"))
  lu.assertEquals(rc, 0)
  lu.assertStrContains(H.readfile(d .. "/.out"),
    (COMBINED and "ARGS " or " ") .. "-2=lua5.4 -1=-W 0=t.lua 1=echo 2=0 3=z\n")
  H.sh(("cd %s && %s --kill %s,-W t.lua"):format(q(d), CLIENT, OURWORD))
end

function TestOurClient:test_both_wrappers_reach_one_server ()
  local d = newdir()
  local a = ourcall(d, "end")
  lu.assertEquals({a:wait(30)}, {"exit", 0}, a:err())
  local s = server(d)
  lu.assertEquals(call(d, "end").rc, 0)  -- Debian's, same ident
  lu.assertEquals(server(d), s)
  local b = ourcall(d, "end")
  lu.assertEquals({b:wait(30)}, {"exit", 0})
  lu.assertEquals(server(d), s)
end

-- }======================================================


os.exit(lu.LuaUnit.run())
