-- The lua-prefork command (the client of prefork-interp) against real
-- servers: Perl's Proc::Prefork::Interp (chiark-scripts), Debian's own
-- wrapper /usr/bin/prefork-interp, and fake servers written in Perl.
-- Each test works in a fresh temp dir D: the ident hashes the cwd and the
-- script path, so its servers are its own in the user's real run dir.
-- Teardown kills every process whose command line names D, by PID, and
-- removes D and the sockets and locks its servers left.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"

local CLIENT = os.getenv("LUA_PREFORK_CLIENT") or "build/lua-prefork"
if CLIENT:sub(1, 1) ~= "/" then CLIENT = H.sh("pwd"):match("[^\n]+") .. "/" .. CLIENT end
local DEBIAN = "/usr/bin/prefork-interp"
local FIXTURES = H.sh("pwd"):match("[^\n]+") .. "/spec/fixtures/client/"

local D  -- this test's directory


local function q (s) return "'" .. s:gsub("'", "'\\''") .. "'" end


--- Run a shell command line in D (bounded); {code, out, err}.
local function run (cmd, input)
  local out, err, inf = D .. "/.out", D .. "/.err", "/dev/null"
  if input then inf = D .. "/.in"; H.writefile(inf, input) end
  local _, how, code = os.execute(("unset LD_PRELOAD; cd %s && timeout -k 5 30 sh -c %s <%s >%s 2>%s")
                                  :format(q(D), q(cmd), inf, out, err))
  return {how = how, code = code, out = H.readfile(out) or "",
          err = H.readfile(err) or ""}
end


--- Start the client in D as a process of its own (H.spawn: this process
-- is its parent, so a death by signal shows as such); pre: shell commands
-- to run first, in the same process.
local function spawn (args, pre)
  local cmd = "env -C " .. q(D) .. " " .. CLIENT .. " " .. args
  if pre then cmd = "sh -c " .. q(pre .. " exec " .. cmd) end
  return H.spawn(cmd)
end


local function server () return D .. "/server.pl" end

--- The setups seen so far: a list of {pid, path, fds, named}.
local function setups ()
  local t = {}
  for line in (H.readfile(D .. "/setups") or ""):gmatch("[^\n]+") do
    local pid, path, fds, named = line:match("^(%d+) (%S+) fds=([%d ]*) named=([%d ]*)$")
    t[#t + 1] = {pid = tonumber(pid), path = path, fds = fds, named = named}
  end
  return t
end


local function sid (r) return tonumber(r.out:match("sid=(%d+)")) end


local function alive (pid)
  local st = H.pstate(pid)
  return st ~= nil and st ~= "Z"
end


--- PIDs of live processes whose command line mentions s, or whose cwd is
-- s or under it.
local function pids_naming (s)
  local out, seen = {}, {}
  for pid, cwd in H.sh("ls -l /proc/[0-9]*/cwd 2>/dev/null")
                  :gmatch("/proc/(%d+)/cwd %-> ([^\n]*)") do
    if cwd == s or cwd:sub(1, #s + 1) == s .. "/" then seen[pid] = true end
  end
  for pid in H.sh("ls /proc"):gmatch("%d+") do
    local c = H.readfile("/proc/" .. pid .. "/cmdline")
    if c and (seen[pid] or c:find(s, 1, true)) and alive(pid) then
      out[#out + 1] = tonumber(pid)
    end
  end
  return out
end


--- The watcher of a server of D: a process in a session of its own whose
-- command line is a client's (lua-prefork or prefork-interp) naming D.
local function watchers ()
  local out = {}
  for _, pid in ipairs(pids_naming(D)) do
    local st = H.readfile("/proc/" .. pid .. "/stat") or ""
    local sess = tonumber(st:match("%) %S+ %d+ %d+ (%d+)"))
    local c = H.readfile("/proc/" .. pid .. "/cmdline") or ""
    if sess == pid and (c:find("lua-prefork", 1, true) or c:find("prefork-interp", 1, true)) then
      out[#out + 1] = pid
    end
  end
  return out
end


local function gone (pid) return not alive(pid) end


local function reap_all ()
  repeat until not prefork.wait(-1, "nohang")
end


--- The run dir, as the client chooses it.
local function runbase ()
  local uid = H.sh("id -u"):match("%d+")
  local st = H.sh("stat -c '%F %u %a' /var/run/user/" .. uid .. " 2>/dev/null")
  local kind, owner, mode = st:match("^(.-) (%d+) (%d+)")
  if kind == "directory" and owner == uid and tonumber(mode, 8) & 63 == 0 then
    return "/var/run/user/" .. uid .. "/prefork-interp"
  end
  local home = H.sh("getent passwd " .. uid):match("^[^:]*:[^:]*:[^:]*:[^:]*:[^:]*:([^:]*)")
  local host = H.sh("uname -n"):match("^[^.\n]+"):sub(1, 32)
  return home .. "/.prefork-interp/" .. host
end


--- A fake server (fixtures/client/fake.pl) on the socket of ident "lptTAG";
-- the fake process, and the client options that reach it.
local function fake (self, mode, arg)
  local tag = D:match("[^.]+$")
  local path = runbase() .. "/slpt" .. tag
  os.execute("mkdir -p -m 0700 " .. q(runbase()))
  self.idents[#self.idents + 1] = path
  local f = H.spawn("perl " .. D .. "/fake.pl " .. path .. " " .. mode .. " " .. (arg or ""))
  f:expect("ready\n")
  return f, "-g lpt" .. tag .. " -U perl " .. server()
end

--- The socket path prefork-interp derives (reference §2), computed here
-- independently: o = {interp=, flags=, script=, items=, cwd=}; items are
-- {"G", STRING} or {"E", NAME, VALUE-or-nil} in command-line order.
local function sockpath (o)
  local b = {"\1", "u" .. string.pack("T", 390)}
  local uts = {}
  for _, f in ipairs{"-s", "-n", "-r", "-v", "-m"} do
    uts[#uts + 1] = H.sh("uname " .. f):gsub("\n$", "")
  end
  uts[6] = (H.readfile("/proc/sys/kernel/domainname") or ""):gsub("\n$", "")
  b[#b + 1] = "u"
  for _, f in ipairs(uts) do b[#b + 1] = f .. ("\0"):rep(65 - #f) end
  for _, path in ipairs{o.cwd or D, "/"} do
    local dev, ino = H.sh("stat -L -c '%d %i' " .. q(path)):match("(%d+) (%d+)")
    b[#b + 1] = (path == "/" and "/" or ".") .. string.pack("I8", tonumber(dev))
    b[#b + 1] = "i" .. string.pack("I8", tonumber(ino))
  end
  for _, it in ipairs(o.items or {}) do
    b[#b + 1] = it[1] .. it[2] .. "\0"
    if it[1] == "E" then b[#b + 1] = it[3] and "v" .. it[3] .. "\0" or "\0" end
  end
  b[#b + 1] = "i" .. o.interp .. "\0"
  for _, f in ipairs(o.flags or {}) do b[#b + 1] = "f" .. f .. "\0" end
  if o.script then b[#b + 1] = "s" .. o.script .. "\0" end
  local tmp = D .. "/.hashin"
  H.writefile(tmp, table.concat(b))
  local hex = H.sh("sha256sum " .. q(tmp)):match("^%x+")
  os.remove(tmp)
  local base = runbase()
  return base .. "/s" .. hex:sub(1, math.min(64, 108 - #base - 12))
end


Test = {}

--- Remember a server's socket for tearDown to remove (with its lock).
function Test:track (o) self.idents[#self.idents + 1] = sockpath(o) end


function Test:setUp ()
  D = H.sh("mktemp -d /tmp/lpclient.XXXXXX"):match("[^\n]+")
  for _, f in ipairs{"server.pl", "fake.pl", "probe.lua"} do
    H.writefile(D .. "/" .. f, H.readfile(FIXTURES .. f))
  end
  self.idents = {}  -- socket paths to remove (with their locks)
end

function Test:tearDown ()
  H.cleanup()
  H.wait_until(function ()  -- (a watcher may fork once more meanwhile)
    for _, pid in ipairs(pids_naming(D)) do H.kill(pid, "KILL") end
    reap_all()
    return #pids_naming(D) == 0
  end, 10, "the processes of " .. D .. " gone")
  for _, s in ipairs(setups()) do self.idents[#self.idents + 1] = s.path end
  for line in (H.readfile(D .. "/probe") or ""):gmatch("[^\n]+") do
    self.idents[#self.idents + 1] = line:match("^%S+")
  end
  for _, p in ipairs(self.idents) do
    if p:sub(1, 1) == "/" then
      os.remove(p)
      os.remove((p:gsub("/s([^/]*)$", "/l%1")))
    end
  end
  os.execute("rm -rf " .. q(D))
  lu.assertEquals(pids_naming(D), {})
end


-- {======================================================
-- Calls
-- =======================================================

function Test:test_many_calls_one_server_args_env_stdin_exit_codes ()
  local first
  for i = 1, 15 do
    local r = run("FOO=v" .. i .. " " .. CLIENT .. " -U perl " .. server() .. " echo a\\ b " .. i % 4,
                  "line " .. i .. "\nmore\n")
    lu.assertEquals(r.code, i % 4, r.err)
    lu.assertStrContains(r.out, "argv=perl " .. server() .. " echo a b " .. i % 4 .. "\n")
    lu.assertStrContains(r.out, "FOO=v" .. i .. "\n")
    lu.assertStrContains(r.out, "PI=unset\n")  -- the executor gets the caller's env
    lu.assertStrContains(r.out, "LINE " .. i .. "\nMORE\n")
    first = first or sid(r)
    lu.assertEquals(sid(r), first)  -- the same server
  end
  lu.assertEquals(#setups(), 1)
  local r = run(CLIENT .. " -U perl " .. server() .. " stderr 255")
  lu.assertEquals(r.code, 255)
  lu.assertEquals(r.err, "to stderr\n")
  lu.assertNotStrContains(r.out, "to stderr")
end

function Test:test_a_lua_server_starts_with_LD_BIND_NOW ()
  -- the fake server is Perl's, run here through an interpreter named lua*
  local lua = D .. "/lua-as-perl"
  assert(os.execute("ln -s \"$(command -v perl)\" " .. q(lua)))
  local r = run("unset LD_BIND_NOW; " .. CLIENT .. " -U " .. lua .. " " .. server() .. " echo")
  lu.assertEquals(r.code, 0, r.err)
  lu.assertEquals(H.readfile(D .. "/setupenv"), "LD_BIND_NOW=1\n")
  lu.assertStrContains(r.out, "BN=-\n")  -- the executor has the caller's env
  r = run("LD_BIND_NOW= " .. CLIENT .. " -f -U " .. lua .. " " .. server() .. " echo")
  lu.assertEquals(r.code, 0, r.err)
  lu.assertEquals(H.readfile(D .. "/setupenv"), "LD_BIND_NOW=1\nLD_BIND_NOW=\n")  -- the caller's value stays
  -- another interpreter (Perl's XS modules may rely on lazy binding): none
  r = run("unset LD_BIND_NOW; " .. CLIENT .. " -f -U perl " .. server() .. " echo")
  lu.assertEquals(r.code, 0, r.err)
  lu.assertEquals(H.readfile(D .. "/setupenv"), "LD_BIND_NOW=1\nLD_BIND_NOW=\nLD_BIND_NOW=-\n")
end

function Test:test_concurrent_callers ()
  run(CLIENT .. " -U perl " .. server())  -- the server exists
  local cmd = {}
  for i = 1, 6 do  -- each call waits (up to 10 s) until three run at once
    cmd[#cmd + 1] = ("(%s -U perl %s meet 3 %d >o%d; echo $? >rc%d) &"):format(
                    CLIENT, server(), i, i, i)
  end
  local r = run("sh -c " .. q(table.concat(cmd, " ") .. " wait"))
  lu.assertEquals(r.code, 0)
  for i = 1, 6 do
    lu.assertEquals(H.readfile(D .. "/rc" .. i), i .. "\n")
    lu.assertStrContains(H.readfile(D .. "/o" .. i), "meet 3 " .. i .. "\n")
    lu.assertStrMatches(H.readfile(D .. "/o" .. i), ".*met [3-6]\n.*")  -- not one by one
  end
  lu.assertEquals(#setups(), 1)
end

function Test:test_plain_form_is_U_lua ()
  -- probe.lua runs as SETUP and records the socket it got, then exits
  -- without init: both wrappers say so with 127
  local a = run(CLIENT .. " " .. D .. "/probe.lua x y")
  local b = run(DEBIAN .. " -U lua5.4 " .. D .. "/probe.lua x y")
  lu.assertEquals(a.code, 127)
  lu.assertStrContains(a.err, "lua-prefork: setup failed: initial monitor process quit")
  lu.assertEquals(b.code, 127)
  local lines = {}
  for l in H.readfile(D .. "/probe"):gmatch("[^\n]+") do lines[#lines + 1] = l end
  lu.assertEquals(#lines, 2)
  lu.assertEquals(lines[1], lines[2])  -- same socket path, same argv
  lu.assertStrContains(lines[1], " lua5.4 " .. D .. "/probe.lua x y")
  lu.assertStrMatches(lines[1], "^/%S+/s" .. ("%x"):rep(64) .. " .*")
end

function Test:test_comma_form_with_interpreter_flags ()
  -- Debian's wrapper takes "perl,-w" for the interpreter's name
  self:track{interp = "perl,-w", script = server()}
  local d = run(DEBIAN .. " -U,perl,-w " .. server() .. " x")
  lu.assertEquals(d.code, 127)
  lu.assertStrContains(d.err, "execute perl,-w")
  local r = run(CLIENT .. " -U,perl,-w " .. server() .. " x 5")
  lu.assertEquals(r.code, 5, r.err)
  lu.assertStrContains(r.out, "argv=perl -w " .. server() .. " x 5\n")
  -- the flags are part of the ident: without them, another server
  local r2 = run(CLIENT .. " -U,perl " .. server() .. " x 0")
  lu.assertEquals(r2.code, 0, r2.err)
  lu.assertNotEquals(sid(r2), sid(r))
  lu.assertEquals(#setups(), 2)
  lu.assertNotEquals(setups()[1].path, setups()[2].path)
  -- and without flags the comma form is Debian's (same server)
  local d2 = run(DEBIAN .. " -U,perl " .. server() .. " x 0")
  lu.assertEquals(sid(d2), sid(r2))
  -- the space form, and flags for Lua (probe: arg[-1] is the flag)
  run(CLIENT .. " " .. q("-U lua5.4 -W") .. " " .. D .. "/probe.lua z")
  run(CLIENT .. " -U,lua5.4,-W " .. D .. "/probe.lua z")
  local p = H.readfile(D .. "/probe")
  local l1, l2 = p:match("^([^\n]*)\n([^\n]*)\n$")
  lu.assertEquals(l1, l2)
  lu.assertStrContains(l1, " lua5.4 -W " .. D .. "/probe.lua z")
end

function Test:test_shebang_lines ()
  os.execute("mkdir " .. q(D .. "/sb"))
  local function script (name, first, from)
    H.writefile(D .. "/sb/" .. name, first .. "\n" .. H.readfile(D .. "/" .. from))
    os.execute("chmod +x " .. q(D .. "/sb/" .. name))
  end
  script("server.pl", "#!" .. CLIENT .. " -U,perl,-w", "server.pl")
  local r = run(D .. "/sb/server.pl echo 3", "sb\n")
  lu.assertEquals(r.code, 3, r.err)
  lu.assertStrContains(r.out, "argv=perl -w " .. D .. "/sb/server.pl echo 3\nsid=")
  lu.assertStrContains(r.out, "SB\n")
  self.idents[#self.idents + 1] = H.readfile(D .. "/sb/setups"):match("^%d+ (%S+)")
  -- #!/usr/bin/env lua-prefork: the plain form, that is -U lua5.4
  script("probe.lua", "#!/usr/bin/env lua-prefork", "probe.lua")
  local dir = CLIENT:match("^(.*)/")
  r = run("PATH=" .. q(dir) .. ":$PATH sb/probe.lua a")
  lu.assertEquals(r.code, 127)
  lu.assertStrContains(r.err, "setup failed")
  r = run(DEBIAN .. " -U lua5.4 sb/probe.lua a")
  local l1, l2 = H.readfile(D .. "/sb/probe"):match("^([^\n]*)\n([^\n]*)\n$")
  lu.assertEquals(l1, l2)
  lu.assertStrContains(l1, " lua5.4 sb/probe.lua a")
  self.idents[#self.idents + 1] = l1:match("^%S+")
end

function Test:test_ident_is_debians_byte_exact_flags_as_f_items ()
  run(DEBIAN .. " -U perl " .. server() .. " 0")
  lu.assertEquals(setups()[1].path, sockpath{interp = "perl", script = server()})
  run("FOO=x " .. CLIENT .. " -U -GA -E FOO -E BAR -G=b perl " .. server() .. " 0")
  lu.assertEquals(setups()[2].path, sockpath{interp = "perl", script = server(),
    items = {{"G", "A"}, {"E", "FOO", "x"}, {"E", "BAR"}, {"G", "b"}}})
  run(CLIENT .. " -U,perl,-w,-T " .. server() .. " 0")
  lu.assertEquals(setups()[3].path, sockpath{interp = "perl", script = server(),
                                             flags = {"-w", "-T"}})
  lu.assertEquals(#setups(), 3)
end

-- }======================================================


-- {======================================================
-- Modes, stale sockets, both wrappers
-- =======================================================

function Test:test_fresh_starts_a_new_server_and_the_old_one_quits ()
  local a = run(CLIENT .. " -U perl " .. server())
  lu.assertEquals(#watchers(), 1)
  local old_watcher = watchers()[1]
  local b = run(CLIENT .. " -f -U perl " .. server())
  lu.assertEquals(b.code, 0, b.err)
  lu.assertNotEquals(sid(b), sid(a))
  H.wait_until(function () return gone(sid(a)) end, 10, "the old server to quit")
  H.wait_until(function () return gone(old_watcher) end, 10, "the old watcher to quit")
  local c = run(CLIENT .. " -U perl " .. server())
  lu.assertEquals(sid(c), sid(b))
  lu.assertEquals(#setups(), 2)
  lu.assertEquals(setups()[1].path, setups()[2].path)
end

function Test:test_kill_removes_socket_and_lock_and_the_server_quits ()
  local a = run(CLIENT .. " -U perl " .. server())
  local path = setups()[1].path
  local lock = path:gsub("/s([^/]*)$", "/l%1")
  lu.assertNotNil(H.readfile(lock))
  local w = watchers()
  lu.assertEquals(#w, 1)
  local k = run(CLIENT .. " --kill -U perl " .. server())
  lu.assertEquals(k.code, 0, k.err)
  lu.assertEquals(k.out, "")
  lu.assertNil(io.open(path))
  lu.assertNil(io.open(lock))
  H.wait_until(function () return gone(sid(a)) end, 10, "the server to quit")
  H.wait_until(function () return gone(w[1]) end, 10, "the watcher to quit")
end

function Test:test_stale_socket_after_kill_9 ()
  local a = run(CLIENT .. " -U perl " .. server())
  local w = watchers()
  H.kill(sid(a), "KILL")
  H.wait_until(function () return gone(sid(a)) end, 5, "the server to die")
  -- the watcher sees its sentinel close and goes too: nothing left behind
  H.wait_until(function () return gone(w[1]) end, 10, "the watcher to quit")
  local b = run(CLIENT .. " -U perl " .. server() .. " echo 4", "again\n")
  lu.assertEquals(b.code, 4, b.err)
  lu.assertStrContains(b.out, "AGAIN\n")
  lu.assertNotEquals(sid(b), sid(a))
  lu.assertEquals(setups()[1].path, setups()[2].path)
end

function Test:test_debian_wrapper_and_lua_prefork_share_servers_both_orders ()
  local a = run(DEBIAN .. " -U perl " .. server() .. " echo 1", "x\n")
  local b = run(CLIENT .. " -U perl " .. server() .. " echo 2", "y\n")
  lu.assertEquals({a.code, b.code}, {1, 2})
  lu.assertStrContains(b.out, "Y\n")
  lu.assertEquals(sid(a), sid(b))
  lu.assertEquals(#setups(), 1)
  -- the other order, in a fresh cwd (another ident)
  os.execute("mkdir " .. q(D .. "/sub"))
  local c = run("cd sub && " .. CLIENT .. " -UE=FOO -G g perl " .. server() .. " 3")
  local d = run("cd sub && " .. DEBIAN .. " -U -EFOO -Gg perl " .. server() .. " 4")
  lu.assertEquals({c.code, d.code}, {3, 4}, c.err .. d.err)
  lu.assertEquals(sid(c), sid(d))
  lu.assertEquals(#setups(), 2)
  lu.assertNotEquals(setups()[1].path, setups()[2].path)
  -- -E is in the ident: another value, another server
  local e = run("cd sub && FOO=1 " .. CLIENT .. " -U -EFOO -Gg perl " .. server() .. " 0")
  lu.assertNotEquals(sid(e), sid(c))
end

-- }======================================================


-- {======================================================
-- Signals
-- =======================================================

function Test:test_signal_forwarding_degrades_to_sigint_on_a_perl_server ()
  run(CLIENT .. " -U perl " .. server())
  local p = spawn("-U perl " .. server() .. " wait 8")
  H.wait_until(function () return H.readfile(D .. "/running") end, 10, "the executor")
  p:kill("TERM")  -- forwarded: the Perl monitor sees the call readable
  local how, code = p:wait(10)
  lu.assertEquals({how, code}, {"exit", 7})  -- the client waited for the status
  lu.assertStrContains(p:out(), "got INT\n")
  lu.assertStrMatches(H.readfile(D .. "/int"), "INT %d+\n")
end

function Test:test_signal_ignored_by_the_caller_is_not_forwarded ()
  run(CLIENT .. " -U perl " .. server())
  local p = spawn("-U perl " .. server() .. " wait 1 0", "trap '' INT;")
  H.wait_until(function () return H.readfile(D .. "/running") end, 10, "the executor")
  p:kill("INT")
  local how, code = p:wait(10)
  lu.assertEquals({how, code}, {"exit", 0})
  lu.assertNil(H.readfile(D .. "/int"))
end

function Test:test_client_killed_the_executor_gets_sigint_nothing_left ()
  run(CLIENT .. " -U perl " .. server())
  local p = spawn("-U perl " .. server() .. " wait 8")
  H.wait_until(function () return H.readfile(D .. "/running") end, 10, "the executor")
  p:kill("KILL")
  lu.assertEquals({p:wait(10)}, {"signal", 9})
  H.wait_until(function () return H.readfile(D .. "/int") end, 10, "the INT handler")
  -- left: the server and its watcher only
  H.wait_until(function () return #pids_naming(D) == 2 end, 10, "the monitor to go")
end

function Test:test_forwarded_bytes_are_the_signal_numbers ()
  local f, opts = fake(self, "bytes", 2)
  local p = spawn(opts)
  f:expect("request perl " .. server() .. "\n")
  p:kill("USR1")
  f:expect("byte 10\n")
  p:kill("WINCH")
  f:expect("byte 28\n")
  lu.assertEquals({p:wait(10)}, {"exit", 0})  -- it kept waiting for the status
end

function Test:test_caller_dies_of_the_executors_signal ()
  run(CLIENT .. " -U perl " .. server())
  for _, s in ipairs{{"TERM", 15}, {"USR1", 10}, {"SEGV", 11}, {"KILL", 9}} do
    local p = spawn("-U perl " .. server() .. " die " .. s[1])
    lu.assertEquals({p:wait(10)}, {"signal", s[2]}, s[1])
  end
  -- Debian's only propagates a few; SEGV is an error there
  local d = run(DEBIAN .. " -U perl " .. server() .. " die SEGV")
  lu.assertEquals(d.code, 127)
  -- a signal that does not kill (from a fake status): exit 128 + N
  local _, opts = fake(self, "status", 28)
  local r = run(CLIENT .. " " .. opts)
  lu.assertEquals(r.code, 128 + 28, r.err)
  lu.assertEquals(r.err, "")
end

-- }======================================================


-- {======================================================
-- Bad input, setup failures, fds, run dir
-- =======================================================

function Test:test_bad_greetings_are_clear_errors ()
  local cases = {
    {"badmagic", "lua%-prefork: got unexpected protocol magic 0x5846490a\n"},
    {"hugexlen", "lua%-prefork: greeting extra data of 65537 bytes is over the limit of 65536\n"},
    {"eofxlen", "lua%-prefork: monitor process quit unexpectedly %(in the greeting%)\n"},
    {"eofxdata", "lua%-prefork: monitor process quit unexpectedly %(in the greeting%)\n"},
    {"eofstatus", "lua%-prefork: monitor process quit unexpectedly\n"},
    -- gone before the request: the write fails, or the status read
    {"eofrequest", "lua%-prefork: [^\n]*\n"},
  }
  for _, c in ipairs(cases) do
    local f, opts = fake(self, c[1])
    local r = run(CLIENT .. " " .. opts .. " a")
    lu.assertEquals(r.code, 127, c[1])
    lu.assertStrMatches(r.err, "^" .. c[2] .. "$")
    if c[1] == "badmagic" or c[1] == "hugexlen" then  -- no wait for more data:
      lu.assertNotStrContains(f:out(), "closed\n", c[1])  -- the fake still holds on
    end
    f:stop()
  end
end

function Test:test_a_server_of_another_uid_gets_nothing ()
  local nobody = tonumber(H.sh("id -u nobody 2>/dev/null"):match("%d+") or "")
  if H.sh("id -u"):match("%d+") ~= "0" or H.sh("command -v setpriv") == "" or not nobody then
    lu.skip("needs root, setpriv and a user nobody to run a server as another uid")
  end
  -- a fake server run by nobody, from a directory it can read (the
  -- checkout may be under a 0700 one); our socket path a symlink to it
  local T = H.sh("mktemp -d /tmp/lpcred.XXXXXX"):match("%S+")
  H.sh(("chmod 755 %s && mkdir %s/s && chown nobody %s/s && cp %s %s/ && chmod 644 %s/fake.pl")
       :format(T, T, T, q(FIXTURES .. "fake.pl"), T, T))
  local tag = D:match("[^.]+$")
  local path = runbase() .. "/slpt" .. tag
  os.execute("mkdir -p -m 0700 " .. q(runbase()))
  self.idents[#self.idents + 1] = path
  local f = H.spawn(("setpriv --reuid=nobody --regid=nogroup --clear-groups perl %s/fake.pl %s/s/sock status 0")
                    :format(T, T))
  local ok, err = pcall(function ()
    f:expect("ready\n")
    H.sh(("ln -sf %s/s/sock %s"):format(T, q(path)))
    local r = run(CLIENT .. " -g lpt" .. tag .. " -U perl " .. server() .. " a", "secret input\n")
    lu.assertEquals(r.code, 127, r.err)
    lu.assertStrContains(r.err, "lua-prefork: the server on " .. path .. " runs as uid " .. nobody)
    lu.assertStrContains(r.err, "refused (nothing was sent to it)")
    H.wait_until(function () return f:out():match("closed\n") end, 10, "the fake to see the client go")
    lu.assertNotStrContains(f:out(), "request")  -- neither fds nor environment
    lu.assertEquals(#setups(), 0)  -- and no server of ours started instead
  end)
  f:stop()
  os.remove(path)
  H.sh("rm -rf " .. q(T))
  if not ok then error(err, 0) end
end

function Test:test_extra_data_is_skipped ()
  local _, opts = fake(self, "xdata")
  local r = run(CLIENT .. " " .. opts .. " a")
  lu.assertEquals(r.code, 3, r.err)
end

function Test:test_eof_before_the_magic_is_a_stale_server ()
  local f, opts = fake(self, "eofmagic")
  local r = run(CLIENT .. " " .. opts .. " echo 6", "up\n")
  lu.assertEquals(r.code, 6, r.err)  -- a real server replaced the fake one
  lu.assertStrContains(r.out, "UP\n")
  lu.assertEquals(#setups(), 1)
  f:stop()
end

function Test:test_setup_failures ()
  local r = run(CLIENT .. " -U perl " .. server() .. " setupfail")
  lu.assertEquals(r.code, 7)
  self:track{interp = "perl", script = "/dev/null"}
  self:track{interp = "no-such-interp-x", script = server()}
  local s = run(CLIENT .. " -U perl /dev/null")
  lu.assertEquals(s.code, 127)
  lu.assertStrContains(s.err, "didn't call preform_initialisation_complete")
  local e = run(CLIENT .. " -U no-such-interp-x " .. server())
  lu.assertEquals(e.code, 127)
  lu.assertStrContains(e.err, "lua-prefork: execute no-such-interp-x: No such file or directory")
end

function Test:test_usage ()
  local h = run(CLIENT .. " --help")
  lu.assertEquals(h.code, 0)
  lu.assertStrContains(h.out, "usage: lua-prefork")
  for _, args in ipairs{"", "-U", "-X x", "--bogus x", "-E", "--kill=1 x",
                        "-U,-f x", "-f,perl x", "-U,perl"} do
    local r = run(CLIENT .. " " .. args)
    lu.assertEquals(r.code, 255, args)
    lu.assertStrContains(r.err, "usage: lua-prefork", false, args)
  end
  -- bundling and "--"
  local r = run(CLIENT .. " -fU -- perl " .. server() .. " 2")
  lu.assertEquals(r.code, 2, r.err)
end

function Test:test_setup_and_watcher_get_only_their_fds ()
  local r = run("sh -c " .. q("exec 7</dev/null 8>" .. D .. "/x; exec " .. CLIENT
                 .. " -U perl " .. server() .. " noisy"))
  lu.assertEquals(r.code, 0, r.err)
  lu.assertEquals(r.err, "setup\n")  -- setup's stdout is the caller's stderr
  local s = setups()[1]
  local named = {}
  for fd in s.named:gmatch("%d+") do named[#named + 1] = fd end
  lu.assertEquals(#named, 4)
  local expect = {0, 1, 2}
  for _, fd in ipairs(named) do expect[#expect + 1] = tonumber(fd) end
  table.sort(expect)
  local got = {}
  for fd in s.fds:gmatch("%d+") do got[#got + 1] = tonumber(fd) end
  lu.assertEquals(got, expect)
  local w = watchers()
  lu.assertEquals(#w, 1)
  local fds = {}
  for fd in H.sh("ls /proc/" .. w[1] .. "/fd"):gmatch("%d+") do fds[#fds + 1] = tonumber(fd) end
  table.sort(fds)
  lu.assertEquals(fds, {0, 1, 2, 3})  -- the pipes and the inotify fd
end

--- Run fn(dir, try) with a run dir of its own: under another host name
-- (a UTS namespace), ~/.prefork-interp/NAME; try(args) runs the client
-- there. Skips where the run dir is not ~'s or unshare -u is not allowed.
local function private_run_dir (fn)
  local base = runbase()
  local host = H.sh("uname -n"):match("^[^.\n]+"):sub(1, 32)
  if base:sub(-#host - 1) ~= "/" .. host
     or not os.execute("unshare -u true 2>/dev/null") then
    lu.skip("needs the ~ run dir and unshare -u (root)")
  end
  local parent = base:sub(1, -#host - 2)
  os.execute("mkdir -p -m 0700 " .. q(parent))
  local name = "lpt" .. D:match("[^.]+$")
  local dir = parent .. "/" .. name
  local function try (args)
    return run(("unshare -u sh -c %s"):format(
      q("hostname " .. name .. " && exec " .. CLIENT .. " " .. args)))
  end
  local ok, err = pcall(fn, dir, try)
  for _, p in ipairs(pids_naming(D)) do H.kill(p, "KILL") end
  os.execute("rm -f " .. q(dir) .. "/l* " .. q(dir) .. "/s*; rmdir " .. q(dir)
             .. " 2>/dev/null; rm -f " .. q(dir))
  if not ok then error(err, 0) end
end

function Test:test_run_dir_not_ours_alone_is_refused ()
  private_run_dir(function (dir, try)
    local args = "-U perl " .. server()
    os.execute("mkdir -m 0755 " .. q(dir))
    local r = try(args)
    lu.assertEquals(r.code, 127)
    lu.assertStrContains(r.err, "lua-prefork: run directory " .. dir
                         .. " is accessible by group or other (mode 755)")
    os.execute("rmdir " .. q(dir) .. "; mkdir -m 0700 " .. q(D .. "/real")
               .. " && ln -s " .. q(D .. "/real") .. " " .. q(dir))
    r = try(args)
    lu.assertEquals(r.code, 127)
    lu.assertStrContains(r.err, "is not a directory")
    lu.assertEquals(H.sh("ls -A " .. q(D .. "/real")), "")
    os.remove(dir)
    r = try(args)  -- made by the client: accepted
    lu.assertEquals(r.code, 0, r.err)
    lu.assertEquals(H.sh("stat -c %a " .. q(dir)), "700\n")
  end)
end

function Test:test_preclean_removes_the_least_recently_used_beyond_100 ()
  private_run_dir(function (dir, try)
    os.execute("mkdir -m 0700 " .. q(dir))
    -- 104 idents: sockets (plain files will do) with atimes 1 to 104 days
    -- old, and their locks; one ident has a lock only (atime 0: oldest)
    local cmd = {"cd " .. q(dir)}
    for i = 1, 104 do
      local id = ("x%03d"):format(i)
      cmd[#cmd + 1] = ("touch l%s s%s && touch -a -d '-%d days' s%s"):format(id, id, i, id)
    end
    cmd[#cmd + 1] = "touch llonely"
    os.execute(table.concat(cmd, " && "))
    local r = try("-U perl " .. server() .. " 0")  -- the spawn path precleans
    lu.assertEquals(r.code, 0, r.err)
    local left = H.sh("ls " .. q(dir))
    -- 105 old idents, 100 kept: the lonely lock and the 4 least recent go
    for _, gone_id in ipairs{"lonely", "x104", "x103", "x102", "x101"} do
      lu.assertNotStrContains(left, "l" .. gone_id .. "\n")
      lu.assertNotStrContains(left, "s" .. gone_id .. "\n")
    end
    for _, kept in ipairs{"x100", "x001", "x050"} do
      lu.assertStrContains(left, "l" .. kept .. "\n")
      lu.assertStrContains(left, "s" .. kept .. "\n")
    end
    local n = 0
    for _ in left:gmatch("\ns") do n = n + 1 end
    lu.assertEquals(n + (left:match("^s") and 1 or 0), 101)  -- and the new one
  end)
end

-- }======================================================

os.exit(lu.LuaUnit.run())
