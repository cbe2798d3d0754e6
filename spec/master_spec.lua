-- The master and its workers, seen from outside: real processes, real
-- sockets, real signals.

local lu = require "luaunit"
local H = require "helpers"
local socket = require "socket"

-- A worker body that answers each connection with "<id> <pid>\n" after
-- it has read one line (so a held connection holds its worker).
local IDPID = [[
local function idpid (w)
  for c in w:connections() do
    c:settimeout(10)
    if c:read("l") then c:write(w.id, " ", prefork.getpid(), "\n") end
    c:close()
  end
end
]]

--- Open n connections at once, then ask each: a held connection holds
-- its worker, so n workers answer. Returns {[pid] = id}.
local function ask_all (port, n)
  local seen = {}
  local answers, cs = H.ask(port, n, "hi")
  for _, c in ipairs(cs) do c:close() end
  for line in pairs(answers) do
    local id, pid = line:match("^(%S+) (%d+)$")
    seen[tonumber(pid)] = id
  end
  return seen
end

local count = H.count


TestMaster = {}

function TestMaster:tearDown () H.cleanup() end


function TestMaster:test_n_distinct_workers_serve ()
  local p = H.server{workers = 3, code = IDPID .. [[
prefork.start{workers = 3, listen = "127.0.0.1:0", on_start = announce,
              fork = idpid}]]}
  local pids = p.pids
  -- every worker takes one of 3 held connections, once all are in accept
  local seen = H.wait_until(function ()
    local s = ask_all(p.port, 3)
    return count(s) == 3 and s
  end, 5, "3 workers to serve")
  for _, pid in ipairs(pids) do lu.assertNotNil(seen[pid]) end
end


function TestMaster:test_kill9_worker_is_replaced_at_once ()
  local p = H.server{code = IDPID .. [[
prefork.start{workers = 2, listen = "127.0.0.1:0", on_start = announce,
              fork = idpid}]]}
  local before = p.pids
  H.kill(before[1], "KILL")  -- ready, and a KILL is no crash: no backoff
  H.wait_until(function ()
    local k = H.childpids(p.pid)
    return #k == 2 and k[1] ~= before[1] and k[2] ~= before[1]
  end, 5, "a replacement")
  local seen = H.wait_until(function ()
    local s = ask_all(p.port, 2)
    return count(s) == 2 and s
  end, 5, "2 workers to serve")
  lu.assertNil(seen[before[1]])
  lu.assertNotNil(seen[before[2]])
  -- at once: no delay was scheduled
  lu.assertStrContains(p:err(), "(pid " .. before[1] .. ") exited: signal KILL; respawn in 0s\n")
  lu.assertEquals(H.zombies(p.pid), 0)
end


function TestMaster:test_crash_loop_backs_off ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
              fork = function () error("boom at start") end}]])
  p:expect("respawn in 0.8s", 10, "err")  -- the fourth death
  local err = p:err()
  local delays = {}
  for d in err:gmatch("exited: exit 1 before it was ready; respawn in ([%d.]+)s") do
    delays[#delays + 1] = tonumber(d)
  end
  -- each death doubles the delay, from the first: four deaths by then,
  -- not hundreds, and none respawned at once
  lu.assertEquals({table.unpack(delays, 1, 4)}, {0.1, 0.2, 0.4, 0.8})
  for i = 2, #delays do lu.assertTrue(delays[i] > delays[i - 1]) end
  lu.assertNotStrContains(err, "respawn in 0s")
  lu.assertStrContains(err, "boom at start")
  lu.assertStrContains(err, "stack traceback")
end


function TestMaster:test_term_lets_inflight_requests_finish ()
  local p = H.server{workers = 3, head = 'local socket = require "socket"', handler = [[
      c:read("l")
      io.stdout:write("BUSY\n"); io.stdout:flush()
      socket.sleep(0.8)  -- scenario: the request under way at the TERM
      c:write("done ", w.id, "\n")
      c:close()]]}
  local cs = {}
  for i = 1, 3 do
    cs[i] = H.connect(p.port, 5)
    cs[i]:send("go\n")
  end
  H.wait_until(function ()
    local _, n = p:out():gsub("BUSY", "")
    return n == 3
  end, 5, "3 busy workers")
  p:kill("TERM")
  for i = 1, 3 do
    local line, err = cs[i]:receive("*l")
    lu.assertNotNil(line, err)
    lu.assertStrMatches(line, "done %d")
    cs[i]:close()
  end
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:err(), "graceful stop")
end


function TestMaster:test_graceful_timeout_ends_in_kill ()
  local p = H.server{workers = 1, head = 'local socket = require "socket"',
    options = "  graceful_timeout = 0.3,", handler = [[
      io.stdout:write("BUSY\n") io.stdout:flush()
      socket.sleep(30)]]}
  local c = H.connect(p.port, 5)
  p:expect("BUSY\n")
  p:kill("TERM")
  -- the worker would sleep 30 s: the master's KILL ends it
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertStrContains(p:err(), "still running after 0.3s: KILL")
  lu.assertStrContains(p:err(), "stopped: signal KILL")
  c:close()
end


function TestMaster:test_quit_stops_at_once ()
  local p = H.server{head = 'local socket = require "socket"', options = [[
  on_worker_exit = function (m, info)
    print("EXIT", info.how, info.code); io.stdout:flush()
  end,]], handler = [[
      io.stdout:write("BUSY\n") io.stdout:flush()
      socket.sleep(30)]]}
  local c = H.connect(p.port, 5)
  p:expect("BUSY\n")
  p:kill("QUIT")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:out(), "EXIT\tsignal\t9")
  c:close()
end


-- update reads its set from a file the test rewrites before each HUP
local RELOAD = [[
local file = arg[1]
prefork.start{listen = "127.0.0.1:0", on_start = announce,
  update = function ()
    local env = {}
    local chunk, err = loadfile(file, "t", env)
    if not chunk then return nil, err end
    chunk()
    return env.config, env.workers
  end,
  on_reload = function (m, ok, err)
    print("RELOAD", ok, err and err:match("[^\n]*")); io.stdout:flush()
  end,
  on_worker_exit = function (m, info)
    print("EXIT", info.id, info.pid); io.stdout:flush()
  end,
  fork = function (w)
    print("UP", w.id, prefork.getpid(), w.context.v, w.config.c); io.stdout:flush()
    for c in w:connections() do c:close() end
  end}
]]

local function ups (p)
  local t = {}
  for id, pid, v, c in p:out():gmatch("UP\t(%d+)\t(%d+)\t(%S+)\t(%S+)\n") do
    t[#t + 1] = {id = tonumber(id), pid = tonumber(pid), v = v, c = c}
  end
  return t
end

local function running (p)  -- id -> pid of the live workers, by their UP lines
  local live = {}
  for _, pid in ipairs(H.childpids(p.pid)) do live[pid] = true end
  local t = {}
  for _, u in ipairs(ups(p)) do
    if live[u.pid] then t[u.id] = u.pid end
  end
  return t
end


function TestMaster:test_hup_replaces_exactly_the_changed_contexts ()
  local conf = H.tmpname()
  H.writefile(conf, [[config = {c = 1}
    workers = {{id = 1, v = "a"}, {id = 2, v = "a"}, {id = 3, v = "a"}}]])
  local p = H.master(RELOAD, {args = conf})
  local first = H.wait_until(function ()
    local r = running(p)
    return count(r) == 3 and r
  end, 5, "3 workers up")
  H.writefile(conf, [[config = {c = 1}
    workers = {{id = 1, v = "a"}, {id = 2, v = "b"}, {id = 4, v = "a"}}]])
  p:kill("HUP")
  local now = H.wait_until(function ()
    local r = running(p)
    return count(r) == 3 and r[4] and r[2] ~= first[2] and not r[3] and r
  end, 5, "the new set")
  lu.assertEquals(now[1], first[1])  -- unchanged: kept
  p:expect("EXIT\t2\t" .. first[2] .. "\n")  -- the master has reaped them
  p:expect("EXIT\t3\t" .. first[3] .. "\n")
  local out = p:out()
  lu.assertStrContains(out, "RELOAD\ttrue")
  -- the new worker 2 came up before the old one went
  local up2 = out:find("UP\t2\t" .. now[2], 1, true)
  local exit2 = out:find("EXIT\t2\t" .. first[2], 1, true)
  lu.assertNotNil(up2)
  lu.assertNotNil(exit2)
  lu.assertTrue(up2 < exit2)
  lu.assertNotNil(out:find("EXIT\t3\t" .. first[3], 1, true))

  -- a changed config replaces every worker, and workers see it
  H.writefile(conf, [[config = {c = 2}
    workers = {{id = 1, v = "a"}, {id = 2, v = "b"}, {id = 4, v = "a"}}]])
  p:kill("HUP")
  H.wait_until(function ()
    local r = running(p)
    if count(r) ~= 3 then return false end
    for id, pid in pairs(r) do
      if pid == now[id] then return false end
    end
    return true
  end, 5, "every worker replaced")
  lu.assertStrContains(p:out(), "UP\t1\t")
  lu.assertStrMatches(p:out(), ".*UP\t1\t%d+\ta\t2\n.*")
end


function TestMaster:test_failing_update_keeps_the_running_set ()
  local conf = H.tmpname()
  H.writefile(conf, [[config = {c = 1}
    workers = {{id = 1, v = "a"}, {id = 2, v = "a"}}]])
  local p = H.master(RELOAD, {args = conf})
  local first = H.wait_until(function ()
    local r = running(p)
    return count(r) == 2 and r
  end, 5, "2 workers up")
  H.writefile(conf, "this is not Lua")
  p:kill("HUP")
  p:expect("RELOAD\tfalse\t[^\n]+\n")
  H.writefile(conf, "workers = {{id = 1}}")  -- config nil: a failure too
  p:kill("HUP")
  H.wait_until(function ()
    local _, n = p:out():gsub("RELOAD\tfalse", "")
    return n == 2
  end, 5, "the second failed reload")
  lu.assertEquals(running(p), first)
  lu.assertStrContains(p:err(), "reload failed, the running set stays")
end


function TestMaster:test_ttin_and_ttou_change_the_count ()
  local p = H.server{handler = "c:close()", options = [[
  on_worker_exit = function (m, info)
    print("EXIT", info.id); io.stdout:flush()
  end,]]}
  local function n() return #H.childpids(p.pid) end
  lu.assertEquals(n(), 2)
  p:kill("TTIN")
  H.wait_until(function () return n() == 3 end, 5, "3 workers")
  H.ready(p, 3)
  p:kill("TTOU")
  H.wait_until(function () return n() == 2 end, 5, "2 workers again")
  p:kill("TTOU")
  H.wait_until(function () return n() == 1 end, 5, "1 worker")
  lu.assertStrContains(p:out(), "EXIT\t3\nEXIT\t2\n")  -- highest ids first
end


function TestMaster:test_no_zombies_and_no_fd_growth_after_200_respawns ()
  local p = H.server{workers = 1, code = IDPID .. [[
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
              fork = idpid}]]}
  local pid = p.pids[1]
  lu.assertNotNil(H.request_ok(p.port, "x\n"))
  local fds = H.fdcount(p.pid)
  for _ = 1, 200 do
    H.kill(pid, "KILL")
    pid = H.wait_until(function ()
      local k = H.childpids(p.pid)
      return #k == 1 and k[1] ~= pid and k[1]
    end, 5, "a respawn")
    H.request_ok(p.port, "x\n")  -- it serves: it was ready, no backoff
  end
  lu.assertEquals(H.zombies(p.pid), 0)
  lu.assertEquals(H.fdcount(p.pid), fds)
  lu.assertNotStrContains(p:err(), "before it was ready")
end


function TestMaster:test_titles ()
  lu.skipIf(H.valgrind, "under valgrind argv is the tool's: titles are left alone")
  local p = H.server{options = '  title = "pftitle",', handler = "c:close()"}
  local kids = p.pids
  lu.assertEquals(H.cmdline(p.pid), "pftitle master")
  local titles = {H.cmdline(kids[1]), H.cmdline(kids[2])}
  table.sort(titles)
  lu.assertEquals(titles, {"pftitle worker 1", "pftitle worker 2"})
  lu.assertStrContains(H.sh("ps -o args= -p " .. p.pid), "pftitle master")
end


function TestMaster:test_hooks_and_the_master_object ()
  local p = H.master([[
local function say (...) print(...) io.stdout:flush() end
local n = 0
prefork.start{workers = 2, listen = {"127.0.0.1:0", "[::1]:0"},
  update = function (m) return {answer = 42} end,
  on_start = function (m)
    announce(m)
    local ws = m:workers()
    say("WORKERS", #ws, ws[1].id, ws[2].id, math.type(ws[1].pid),
        ws[1].state, ws[1].exits, ws[1].accepted, ws[1].inflight,
        type(ws[1].started))
    say("ADDRS", table.concat(m:addresses(), " "))
  end,
  before_fork = function (m, ctx) say("BEFORE", ctx.id) end,
  after_fork = function (w) say("AFTER", w.id, w.config.answer) end,
  on_worker_exit = function (m, info)
    say("EXIT", info.id, info.pid > 0, info.how, info.code, info.respawn_in)
    n = n + 1
    if n == 1 then error("a hook that raises") end
    if n == 2 then m:stop() end
  end,
  fork = function (w)
    if w.id == 1 then os.exit(7) end
    for c in w:connections() do c:close() end
  end}
print("RETURNED")
]])
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  local out = p:out()
  lu.assertStrContains(out, "WORKERS\t2\t1\t2\tinteger\tstarting\t0\t0\t0\tnumber")
  lu.assertStrMatches(out, ".*ADDRS\t127%.0%.0%.1:%d+ %[::1%]:%d+\n.*")
  lu.assertStrContains(out, "BEFORE\t1\n")
  lu.assertStrContains(out, "BEFORE\t2\n")
  lu.assertStrContains(out, "AFTER\t2\t42\n")
  lu.assertStrContains(out, "EXIT\t1\ttrue\texit\t7\t0.1\n")
  lu.assertStrContains(out, "RETURNED")
  lu.assertStrContains(p:err(), "a hook that raises")
end


function TestMaster:test_every_listener_serves_and_unix_files_go ()
  local path = H.tmpname() .. ".sock"
  local p = H.master(([[
prefork.start{workers = 1, listen = {"127.0.0.1:0", "[::1]:0", "unix:%s"},
  on_start = function (m)
    print("ALL " .. table.concat(m:addresses(), " ")) io.stdout:flush()
    announce(m)
  end,
  fork = function (w)
    for c in w:connections() do c:write("hi ", c:peer(), "\n") c:close() end
  end}
]]):format(path))
  local v4, v6, unix = p:expect("ALL 127%.0%.0%.1:(%d+) %[::1%]:(%d+) unix:(%S+)\n")
  lu.assertEquals(unix, path)
  lu.assertEquals(H.request_ok(tonumber(v4)), "hi 127.0.0.1\n")
  local c6 = socket.tcp6()
  c6:settimeout(5)
  assert(c6:connect("::1", tonumber(v6)))
  lu.assertEquals(c6:receive("*a"), "hi ::1\n")
  local cu = require("socket.unix")()
  cu:settimeout(5)
  assert(cu:connect(path))
  lu.assertStrMatches(cu:receive("*a"), "hi \n")
  cu:close()
  lu.assertEquals(H.sh("test -S " .. path .. " && echo yes"), "yes\n")
  p:kill("TERM")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertEquals(H.sh("test -e " .. path .. " || echo gone"), "gone\n")
end


function TestMaster:test_worker_gets_term_when_the_master_dies ()
  local p = H.server{handler = "c:close()"}
  local kids = p.pids
  p:kill("KILL")
  p:wait(5)
  H.wait_until(function ()
    local a, b = H.pstate(kids[1]), H.pstate(kids[2])
    return (a == nil or a == "Z") and (b == nil or b == "Z")
  end, 5, "orphaned workers to exit")
  H.reap(kids[1])
  H.reap(kids[2])
end


os.exit(lu.LuaUnit.run())
