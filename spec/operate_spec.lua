-- Operating a master: hung workers are replaced (with their traceback),
-- every signal leaves the master alive, workers are recycled, a context
-- that cannot start makes the master give up, the status endpoint
-- answers while every worker hangs, and the master's death ends them all.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"

-- under valgrind every process is several times slower
local SLOW = H.valgrind and 6 or 1

-- a worker answers "<pid>" to a line; "spin" loops in Lua for ever,
-- "sleep" waits in os.execute for ever, "big" grows its heap
local SERVER = [[
local extra = ...
local opts = {workers = 2, listen = "127.0.0.1:0", on_start = announce,
  fork = function (w)
    local keep = {}
    w:serve(function (c)
      local line = c:read("l")
      if line == "spin" then
        local x = 0
        while true do x = x + 1 end  -- SPIN: the loop the traceback names
      elseif line == "sleep" then
        os.execute("sleep 100")
      elseif line == "big" then
        for i = 1, 200000 do keep[#keep + 1] = ("x"):rep(64) .. i end
      end
      c:close(prefork.getpid(), "\n")
    end)
  end}
for k, v in pairs(load("return " .. (extra or "{}"))()) do opts[k] = v end
prefork.start(opts)
]]

local function server (extra)
  return H.master(SERVER, {args = "'" .. (extra or "{}") .. "'"})
end


--- send line on a new connection, and leave it open (it will hang)
local function hang (port, line)
  local c = H.connect(port)
  c:send(line .. "\n")
  return c
end


TestOperate = {}

function TestOperate:tearDown () H.cleanup() end


function TestOperate:test_a_spinning_worker_is_replaced_with_its_traceback ()
  local p = server("{workers = 1, timeout = 1}")
  local old = H.ready(p, 1)[1]
  local c = hang(p.port, "spin")
  -- the worker logs where it hangs, exits, and a new one takes over
  local file, line = p:expect("timed out after [%d.]+s: stack traceback:\n%s*([^\n:]+):(%d+): in ",
                              5 * SLOW, "err")
  lu.assertStrContains(H.readfile(file), "\n")
  local src = {}
  for l in io.lines(file) do src[#src + 1] = l end
  lu.assertStrContains(src[tonumber(line)], "-- SPIN")
  local new = H.wait_until(function ()
    local k = H.childpids(p.pid)
    return #k == 1 and k[1] ~= old and k[1]
  end, 10 * SLOW, "a replacement")  -- at once: "respawn in 0s" below
  lu.assertEquals(H.request_ok(p.port, "x\n"), new .. "\n")
  lu.assertStrContains(p:err(), ("worker 1 (pid %d) timed out after"):format(old))
  lu.assertStrContains(p:err(), "timed out: exit 124; respawn in 0s")
  c:close()
end


function TestOperate:test_a_worker_stuck_in_a_system_call_is_killed_with_what_it_started ()
  local p = server("{workers = 1, timeout = 1}")
  local old = H.ready(p, 1)[1]
  local c = hang(p.port, "sleep")
  local sleeper = H.wait_until(function ()
    for _, k in ipairs(H.descendants(old)) do
      if H.cmdline(k):match("^sleep 100") then return k end
    end
  end, 5, "the sleep")
  p:expect("stuck outside Lua %([^)]+%): KILL", 5 * SLOW, "err")
  H.wait_until(function () return not H.alive(old) end, 5, "the worker to go")
  H.wait_until(function () return not H.alive(sleeper) end, 5, "its sleep to go")
  H.ready(p, 1)
  c:close()
end


function TestOperate:test_a_worker_that_is_never_ready_is_killed_and_the_master_gives_up ()
  local p = H.master([[
local ok, err = pcall(prefork.start, {workers = 1, boot_timeout = 0.5,
  max_boot_failures = 2, on_start = announce,
  fork = function (w) while true do end end})
print("RAISED", err) io.stdout:flush()
]])
  p:expect("RAISED\t[^\n]*giving up: worker 1 failed 2 times in a row "
           .. "before it was ready", 20 * SLOW)
  lu.assertStrContains(p:err(), "not ready after")
  lu.assertStrContains(p:err(), "stack traceback")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end


function TestOperate:test_a_context_that_keeps_failing_makes_start_raise ()
  local p = H.master([[
local ok, err = pcall(prefork.start, {workers = 2, listen = "127.0.0.1:0",
  max_boot_failures = 3, on_start = announce,
  fork = function (w) error("no database", 0) end})
print("RAISED", err) io.stdout:flush()
]])
  p:expect("RAISED\tprefork.start: giving up: worker %d failed 3 times in "
           .. "a row before it was ready %(last: exit 1%)", 20)
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end


function TestOperate:test_every_signal_leaves_the_master_alive ()
  local p = server()
  local pids = H.ready(p, 2)
  for _, sig in ipairs{"USR1", "WINCH", "ALRM", "VTALRM", "PROF",
                       "IO", "URG", "PIPE"} do  -- (USR2 upgrades: deploy_spec)
    p:kill(sig)
    if sig ~= "PIPE" then p:expect(sig .. ": [^\n]+\n", 5, "err") end
  end
  lu.assertEquals(H.request_ok(p.port, "x\n") ~= nil, true)
  lu.assertEquals(H.childpids(p.pid), pids)  -- the same workers
  lu.assertFalse(p:exited())
end


function TestOperate:test_ttin_ttou_log_the_count_and_keep_one ()
  local p = server()
  H.ready(p, 2)
  p:kill("TTIN")
  p:expect("TTIN: 3 workers", 5, "err")
  p:kill("TTIN")
  p:expect("TTIN: 4 workers", 5, "err")
  H.ready(p, 4)
  for n = 3, 1, -1 do
    p:kill("TTOU")
    p:expect(("TTOU: %d worker"):format(n), 5, "err")
  end
  p:kill("TTOU")
  p:expect("TTOU: refused, the last worker stays", 5, "err")
  H.nworkers(p, 1)
  lu.assertNotNil(H.request_ok(p.port, "x\n"))
end


function TestOperate:test_int_stops_and_the_leaving_workers_are_not_respawned ()
  local p = server()
  H.ready(p, 2)
  p:kill("INT")
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  lu.assertStrContains(p:err(), "stopping (INT): graceful stop, 2 workers")
  lu.assertNotStrContains(p:err(), "respawn in")
end


function TestOperate:test_max_requests_recycles_under_load_and_loses_nothing ()
  local port = H.freeport()
  local p = H.spawn(("env MAX_REQUESTS=200 %s bench/hello.lua %d 2"):format(H.lua, port))
  p:expect("listening", 10)
  H.ready(p, 2)
  local out = H.sh(("wrk -t2 -c8 -d3s http://127.0.0.1:%d/ 2>&1"):format(port))
  local requests = tonumber(out:match("(%d+) requests in"))
  local say = out:gsub("%%", "%%%%")  -- (luaunit formats the message)
  lu.assertNotNil(requests, say)
  lu.assertTrue(requests > 1000, say)  -- several generations of workers
  lu.assertNil(out:match("Socket errors"), say)
  lu.assertNil(out:match("Non%-2xx"), say)
  -- one at a time: a recycled worker has stopped before the next goes
  local recycled, draining = 0, nil
  for line in p:err():gmatch("[^\n]+") do
    local pid = line:match("%(pid (%d+)%) is recycled %(it served 2%d%d requests")
    if pid then
      lu.assertNil(draining, "two recycled at once:\n" .. p:err())
      draining, recycled = pid, recycled + 1
    elseif draining and line:match("%(pid " .. draining .. "%) stopped") then
      draining = nil
    end
  end
  lu.assertTrue(recycled >= 4, p:err())
  H.ready(p, 2)
  H.wait_until(function () return #H.childpids(p.pid) == 2 end, 10, "2 workers")
end


function TestOperate:test_max_memory_recycles_a_fat_worker ()
  local p = server("{workers = 1, max_memory = 20 * 1024 * 1024}")
  local old = H.ready(p, 1)[1]
  -- one request, bounded by a limit (request_ok's 2 s per try, each a new
  -- "big", ran out under valgrind)
  lu.assertEquals(H.request(p.port, "big\n", 10 * SLOW), old .. "\n")
  p:expect("is recycled %(%d+ MB resident, over max_memory %(20 MB%)%)", 10 * SLOW, "err")
  H.wait_until(function ()
    local k = H.childpids(p.pid)
    return #k == 1 and k[1] ~= old
  end, 10, "the replacement alone")
end


function TestOperate:test_status_answers_while_every_worker_hangs ()
  local sock = H.tmpname() .. ".sock"
  local p = server(("{workers = 2, timeout = false, status = %q}"):format("unix:" .. sock))
  local pids = H.ready(p, 2)
  -- the second only once the first spins: sent together, both may wait
  -- for the same worker's wake-up, which takes them both before either
  -- handler runs, and the second then waits behind the first's loop
  local cs = {hang(p.port, "spin")}
  H.wait_until(function ()
    local t0 = {}
    for i, pid in ipairs(pids) do t0[i] = H.cputicks(pid) end
    H.sleep(0.2)
    for i, pid in ipairs(pids) do
      if H.cputicks(pid) - t0[i] >= 10 then return true end
    end
  end, 10, "a worker spinning")
  cs[2] = hang(p.port, "spin")
  H.wait_until(function ()
    local j = H.sh("curl -s --max-time 5 --unix-socket " .. sock .. " http://x/")
    return j:match('"inflight":1,.*"inflight":1,')
  end, 5, "both workers busy in the status")
  local json = H.sh("curl -s --max-time 5 --unix-socket " .. sock .. " http://x/")
  lu.assertStrMatches(json, '^{.*"pid":' .. p.pid .. ',.*"workers":%[{.*}%]}\n$')
  lu.assertStrContains(json, '"state":"running"')
  local metrics = H.sh("curl -s --max-time 5 --unix-socket " .. sock .. " http://x/metrics")
  lu.assertStrContains(metrics, "# TYPE prefork_workers gauge\n")
  lu.assertStrContains(metrics, 'prefork_workers{state="running"} 2\n')
  lu.assertStrContains(metrics, "# TYPE prefork_requests_total counter\n")
  lu.assertStrContains(metrics, "prefork_respawns_total 0\n")
  lu.assertStrContains(metrics, "prefork_timeouts_total 0\n")
  lu.assertStrContains(H.sh("curl -s -o /dev/null -w '%{http_code}' --unix-socket "
                            .. sock .. " http://x/nope"), "404")
  for _, c in ipairs(cs) do c:close() end
end


function TestOperate:test_count_adds_requests_and_tick_sees_them ()
  local p = H.server{workers = 1, serve = true, options = [[
  tick = 0.1,
  on_tick = function (m)
    local st = m:stats()
    io.stdout:write("TICK ", st.requests, " ", st.workers[1].requests or "-", "\n")
    io.stdout:flush()
  end,]], handler = [[c:read("l") w:count(10) c:write("ok\n")]]}
  lu.assertEquals(H.request_ok(p.port, "x\n"), "ok\n")
  p:expect("TICK 11 11\n", 5)
end


function TestOperate:test_beat_keeps_a_long_computation_alive ()
  local p = H.master(([[
local now = require("prefork.core").now
prefork.start{workers = 1, listen = "127.0.0.1:0", on_start = announce,
  timeout = %g,
  fork = function (w)
    w:serve(function (c)
      c:read("l")
      local stop = now() + %g  -- longer than timeout, beating all along
      while now() < stop do w:beat() end
      c:close(prefork.getpid(), "\n")
    end)
  end}
]]):format(SLOW == 1 and 1 or 3, SLOW == 1 and 2.5 or 5))
  local pid = H.ready(p, 1)[1]
  lu.assertEquals(H.request(p.port, "x\n", 20), pid .. "\n")
  lu.assertNotStrContains(p:err(), "timed out")
end


function TestOperate:test_the_masters_death_ends_every_worker ()
  local p = server("{workers = 2, timeout = false}")
  local pids = H.ready(p, 2)
  local cs = {hang(p.port, "spin"), hang(p.port, "sleep")}
  local sleeper = H.wait_until(function ()
    for _, w in ipairs(pids) do
      for _, k in ipairs(H.descendants(w)) do
        if H.cmdline(k):match("^sleep 100") then return k end
      end
    end
  end, 5, "the sleep")
  p:kill("KILL")
  p:wait(5)
  -- (left alone they would spin, and sleep 100 s: the bound is a limit)
  for _, pid in ipairs(pids) do
    H.wait_until(function () return not H.alive(pid) end, 10 * SLOW, "worker " .. pid)
  end
  H.wait_until(function () return not H.alive(sleeper) end, 10 * SLOW, "the sleep")
  for _, c in ipairs(cs) do c:close() end
end


os.exit(lu.LuaUnit.run())
