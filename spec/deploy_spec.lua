-- Deployment: inherited sockets (systemd, Server::Starter, einhorn,
-- fd:N), sd_notify, the USR2 upgrade and its rollback, the pid file,
-- the log file and USR1, the workers' user.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"
local core = require "prefork.core"
local socket = require "socket"

-- what the sanitizer builds preload into Lua ("" otherwise): a script
-- run by its #! line needs it too
local PRELOAD = H.lua:match("^(env LD_PRELOAD=%S+) ") or ""

-- systemd-socket-activate starts its command with a clean environment
-- but for what -E names
local PASS = "-E LISTEN -E LUA_PATH -E LUA_CPATH"

-- the app: a master (from the build under test: LUA_PATH, LUA_CPATH)
-- whose workers answer a line with "MARK pid"; the environment chooses
-- its options
local APP = [[
#!/usr/bin/env lua5.4
local prefork = require "prefork"
local MARK = %q
local listen = os.getenv("LISTEN")
prefork.start{workers = 2, listen = listen ~= "" and listen or nil,
  pid_file = os.getenv("PIDFILE"), log = os.getenv("LOGFILE"),
  user = os.getenv("USER_"), on_start = function (m)
    io.stdout:write("ADDR ", m:addresses()[1] or "-", "\n") io.stdout:flush()
  end,
  fork = function (w)
    w:serve(function (c)
      local line = c:read("l")
      if line == "say" then io.stderr:write("WORKER SAYS ", MARK, "\n") end
      c:close(MARK, " ", prefork.getpid(), "\n")
    end)
  end}
]]

local dirs = {}

--- a directory of its own with app.lua (marked mark), executable
local function appdir (mark)
  local d = H.sh("mktemp -d /tmp/deploy_spec.XXXXXX"):match("%S+")
  dirs[#dirs + 1] = d
  H.writefile(d .. "/app.lua", APP:format(mark or "v1"))
  H.sh("chmod 755 " .. d .. " " .. d .. "/app.lua")
  return d
end

local function setmark (d, mark)
  H.writefile(d .. "/app.lua", APP:format(mark))
end

--- start the app in d with the environment env ("K=V ..."), by cmd
local function app (d, env, cmd)
  return H.spawn(("sh -c 'cd %s && exec env %s %s'"):format(d, env or "",
                 cmd or (H.lua .. " app.lua")))
end

--- the answer of a server on port to one line
local function ask (port, line)
  return H.request_ok(port, (line or "x") .. "\n", 10)
end


TestDeploy = {}

function TestDeploy:tearDown ()
  H.cleanup()
  for _, d in ipairs(dirs) do H.sh("rm -rf " .. d) end
  dirs = {}
end


function TestDeploy:test_systemd_socket_activation_with_a_name ()
  local d, port = appdir(), H.freeport()
  local p = app(d, "LISTEN=systemd:web", ("systemd-socket-activate -l 127.0.0.1:%d "
                .. "--fdname=web %s %s app.lua"):format(port, PASS, H.lua))
  H.wait_until(function () return H.request(port, "x\n", 5) end, 10, "an answer")
  lu.assertStrMatches(ask(port), "v1 %d+\n")
  p:expect("listening on 127.0.0.1:" .. port .. " %(inherited: systemd:web%)", 5, "err")
  lu.assertNotStrContains(p:err(), "Address already in use")
end


-- the app binds the address of systemd's socket itself: it adopts it
-- instead (EADDRINUSE before)
function TestDeploy:test_systemd_socket_for_the_address_the_app_listens_on ()
  local d, port = appdir(), H.freeport()
  local p = app(d, "LISTEN=127.0.0.1:" .. port, ("systemd-socket-activate -l %d "
                .. "%s %s app.lua"):format(port, PASS, H.lua))
  H.wait_until(function () return H.request(port, "x\n", 5) end, 10, "an answer")
  lu.assertStrMatches(ask(port), "v1 %d+\n")
  p:expect("inherited: systemd:unknown", 5, "err")
end


function TestDeploy:test_sd_notify_ready_reloading_ready_stopping ()
  local d = appdir()
  local sock = d .. "/notify.sock"
  local u = require("socket.unix").udp()
  assert(u:setsockname(sock))
  u:settimeout(10)
  local p = app(d, ("NOTIFY_SOCKET=%s LISTEN=127.0.0.1:0"):format(sock))
  local got = {}
  local function next_msg ()
    local m = assert(u:receive())
    got[#got + 1] = m
    return m
  end
  lu.assertStrMatches(next_msg(), "^READY=1\nMAINPID=" .. p.pid .. "\nSTATUS=2 workers ready$")
  p:kill("HUP")
  lu.assertStrMatches(next_msg(), "^RELOADING=1\nMONOTONIC_USEC=%d+$")
  lu.assertStrMatches(next_msg(), "^READY=1\nSTATUS=%d workers? ready$")
  p:kill("TERM")
  lu.assertEquals(next_msg(), "STOPPING=1")
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  u:close()
end


function TestDeploy:test_einhorn_variables ()
  local d = appdir()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local port = tonumber(l:address():match(":(%d+)$"))
  local env = core.environ()
  env[#env + 1] = "EINHORN_FD_COUNT=1"
  env[#env + 1] = "EINHORN_FD_0=" .. l:getfd()
  env[#env + 1] = "LISTEN="
  local pid = assert(core.exec("/bin/sh", {"sh", "-c", "cd " .. d .. " && exec "
                               .. H.lua .. " app.lua >/dev/null 2>&1"}, env, {l:getfd()}))
  l:close()
  lu.assertStrMatches(ask(port), "v1 %d+\n")
  H.kill(pid, "TERM")
  H.reap(pid, 10)
end


function TestDeploy:test_an_fd_entry_that_is_no_listener_is_refused ()
  local d = appdir()
  local p = app(d, "LISTEN=fd:0")
  lu.assertEquals(select(1, p:wait(10)), "exit")
  lu.assertStrContains(p:err(), 'listen[1] "fd:0": inherited fd 0 (fd:0): not a socket')
end


function TestDeploy:test_server_starter_hup_restart_under_load_loses_nothing ()
  local port = H.freeport()
  local p = H.spawn(("start_server --port=127.0.0.1:%d --interval=1 -- %s "
                     .. "bench/hello.lua %d 2"):format(port, H.lua, port))
  H.wait_until(function () return H.request(port, "GET / HTTP/1.0\r\n\r\n", 5) end,
               10, "hello")
  local w = H.spawn(("wrk -t2 -c20 -d4s http://127.0.0.1:%d/"):format(port))
  -- the restart must happen while wrk runs: its 20 connections are up
  H.wait_until(function ()
    local _, n = H.sh(("ss -tnH state established '( dport = :%d )'"):format(port))
      :gsub("\n", "")
    return n >= 20
  end, 10, "wrk's connections")
  p:kill("HUP")
  w:wait(20)
  local out = w:out()
  lu.assertStrMatches(out, ".*%d+ requests in.*")
  lu.assertNil(out:match("Socket errors"), (out:gsub("%%", "%%%%")))
  lu.assertNil(out:match("Non%-2xx"), (out:gsub("%%", "%%%%")))
  p:expect("new worker is now running, sending TERM to old workers", 10, "err")
  p:kill("TERM")
  p:wait(20)
end


local function upgrade (cmd)
  local d = appdir()
  local pidfile = d .. "/app.pid"
  local p = app(d, "LISTEN=127.0.0.1:0 PIDFILE=" .. pidfile, cmd)
  local port = tonumber(p:expect("ADDR [%d.]+:(%d+)\n", 10))
  lu.assertEquals(tonumber(H.readfile(pidfile)), p.pid)
  lu.assertStrMatches(ask(port), "v1 %d+\n")
  setmark(d, "v2")
  p:kill("USR2")
  p:expect("upgrade: the new master %(pid %d+%) is ready", 20, "err")
  lu.assertEquals({p:wait(20)}, {"exit", 0})  -- the old one went
  lu.assertStrMatches(ask(port), "v2 %d+\n")
  local new = tonumber(H.readfile(pidfile))
  lu.assertNotEquals(new, p.pid)
  lu.assertNil(H.readfile(pidfile .. ".oldbin"))
  H.kill(new, "TERM")
  H.wait_until(function () return not H.alive(new) end, 20, "the new master to stop")
  lu.assertNil(H.readfile(pidfile))  -- removed at its clean stop
end

function TestDeploy:test_usr2_upgrade_loads_the_new_code ()
  upgrade()
end

function TestDeploy:test_usr2_upgrade_of_an_executable_script ()
  upgrade(PRELOAD .. " ./app.lua")
end


function TestDeploy:test_a_failing_upgrade_keeps_the_old_master ()
  local d = appdir()
  local pidfile = d .. "/app.pid"
  local p = app(d, "LISTEN=127.0.0.1:0 PIDFILE=" .. pidfile)
  local port = tonumber(p:expect("ADDR [%d.]+:(%d+)\n", 10))
  H.writefile(d .. "/app.lua", 'error("the new code is broken")\n')
  p:kill("USR2")
  p:expect("upgrade failed, this master goes on: the new master %(pid %d+%): "
           .. "it exited %(1%) before it was ready", 20, "err")
  lu.assertStrMatches(ask(port), "v1 %d+\n")
  lu.assertEquals(tonumber(H.readfile(pidfile)), p.pid)
  lu.assertFalse(p:exited())
end


function TestDeploy:test_usr1_reopens_the_log_of_the_master_and_the_workers ()
  local d = appdir()
  local log = d .. "/app.log"
  local p = app(d, "LISTEN=127.0.0.1:0 LOGFILE=" .. log)
  local port = tonumber(p:expect("ADDR [%d.]+:(%d+)\n", 10))
  H.ready({err = function () return H.readfile(log) or "" end}, 2)
  lu.assertNotNil(H.readfile(log):match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d[+-]%d+ prefork%["))
  os.rename(log, log .. ".1")
  p:kill("USR1")
  H.wait_until(function () return (H.readfile(log) or ""):match("USR1: reopened") end,
               5, "the new log")
  ask(port, "say")  -- a worker's stderr goes to the new file too
  H.wait_until(function () return (H.readfile(log) or ""):match("WORKER SAYS v1") end,
               5, "the worker's line in the new log")
  lu.assertNotStrContains(H.readfile(log .. ".1"), "USR1")
end


function TestDeploy:test_workers_run_as_nobody ()
  if core.getuid() ~= 0 then lu.skip("needs root") end
  local d = appdir()
  local p = app(d, "LISTEN=127.0.0.1:0 USER_=nobody")
  local port = tonumber(p:expect("ADDR [%d.]+:(%d+)\n", 10))
  local pid = tonumber(ask(port):match("v1 (%d+)"))
  local st = H.readfile("/proc/" .. pid .. "/status")
  local nobody = tonumber(H.sh("id -u nobody"))
  lu.assertStrMatches(st, ".*\nUid:%s+" .. nobody .. "%s+" .. nobody .. ".*")
  lu.assertStrMatches(H.readfile("/proc/" .. p.pid .. "/status"), ".*\nUid:%s+0%s.*")
end


function TestDeploy:test_the_systemd_units_of_the_example_are_valid ()
  local d = appdir()
  H.sh(("cp examples/systemd/app.socket examples/systemd/app.service %s/"):format(d))
  local out = H.sh(("systemd-analyze verify %s/app.socket %s/app.service 2>&1"):format(d, d))
  for line in out:gmatch("[^\n]+") do
    lu.assertNil(line:match("app%.s[oe][cr][kv]"), line)  -- (others' units may warn)
  end
  lu.assertNotNil(H.sh("luac5.4 -p examples/systemd/app.lua && echo ok"):match("ok"))
end


os.exit(lu.LuaUnit.run())
