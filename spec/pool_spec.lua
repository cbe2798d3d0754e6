-- prefork.pool: calls answered by worker processes forked from a template,
-- least-loaded first; failures cost one call; nothing is left behind.

local lu = require "luaunit"
local prefork = require "prefork"
local H = require "helpers"

local me = prefork.getpid()

--- Our live children (the pool's template and workers are ours).
local function kids () return H.childpids(me) end

--- Nothing of the pool is left: no live child, no zombie.
local function nothingleft ()
  H.wait_until(function () return #kids() == 0 end, 5, "no children")
  lu.assertEquals(H.zombies(me), 0)
end

local function pid () return prefork.getpid() end

--- A serialiser of strings joined by "|": numbers arrive as strings.
local BARS = {
  encode = function (...) return table.concat({...}, "|") end,
  decode = function (s)
    local t = {}
    for x in s:gmatch("[^|]+") do t[#t + 1] = x end
    return table.unpack(t)
  end,
}

--- A file name for hold: no such file yet.
local function newflag ()
  local flag = H.tmpname()
  os.remove(flag)  -- tmpname made it
  return flag
end

--- A job that holds its call until the file exists (5 s at most), so
-- that calls stay in flight together; the worker's pid.
local function hold (path)
  for _ = 1, 500 do
    local f = io.open(path) if f then f:close() break end
    prefork.sleep(0.01)
  end
  return prefork.getpid()
end

TestPool = {}

function TestPool:tearDown ()
  if self.pool then self.pool:close() self.pool = nil end
  H.cleanup()
  -- orphans of a killed server's pool come to us: they leave on their own
  H.wait_until(function ()
    for _, c in ipairs(H.children(me)) do
      if c.state ~= "Z" then return false end
      H.reap(c.pid)
    end
    return true
  end, 5, "orphans to leave")
end

function TestPool:test_example_prints_ten_results_and_awaits_on_destroy ()
  local p = H.spawn(H.lua .. " examples/pool.lua")
  lu.assertEquals(p:wait(20), "exit")
  lu.assertEquals(p.code, 0)
  local n = 0
  for i, sq in p:out():gmatch("returned\ttrue\tdoit (%d+) in %d+\t(%d+)\n") do
    lu.assertEquals(tonumber(sq), tonumber(i) ^ 2 // 1)
    n = n + 1
  end
  lu.assertEquals(n, 10)
  lu.assertStrContains(p:out(), "destroyed\ttrue\n")
end

function TestPool:test_call_with_callback_and_awaited_call ()
  self.pool = prefork.pool{function (a, b) return a + b, nil, "x" end}
  local got
  self.pool:call(1, 2, function (...) got = table.pack(...) end)
  self.pool:wait()
  lu.assertEquals(got, {true, 3, nil, "x", n = 4})
  local r = table.pack(self.pool:call(40, 2))
  lu.assertEquals(r, {true, 42, nil, "x", n = 4})
end

function TestPool:test_map_in_order_and_raises_on_a_job_error ()
  self.pool = prefork.pool{function (x)
    if x == "bad" then error("no good", 0) end
    return x * 2
  end, max = 3}
  lu.assertEquals(self.pool:map{5, 4, 3, 2, 1}, {10, 8, 6, 4, 2})
  lu.assertErrorMsgContains("no good", self.pool.map, self.pool, {1, "bad", 3})
  lu.assertEquals(self.pool:map{7}, {14})  -- the pool goes on
end

--- The job of the map specs: doubles x; raises for "bad" (a string) and
-- "tbl" (a table).
local function double (x)
  if x == "bad" then error("no good", 0) end
  if x == "tbl" then error{code = 42} end
  return x * 2
end

function TestPool:test_map_in_chunks_keeps_the_order_and_names_the_failed_item ()
  self.pool = prefork.pool{double, max = 2}
  local list, want = {}, {}
  for i = 1, 1000 do list[i], want[i] = i, 2 * i end
  lu.assertEquals(self.pool:map(list), want)  -- chunked by default
  for _, size in ipairs{1, 7, 1000, 5000} do
    lu.assertEquals(self.pool:map(list, {chunksize = size}), want)
  end
  lu.assertEquals(self.pool:map{}, {})
  -- the failed item is named, wherever it is in its chunk
  local ok, err = pcall(self.pool.map, self.pool, {1, 2, "bad", 4, 5}, {chunksize = 5})
  lu.assertFalse(ok)
  lu.assertStrContains(err, "item 3: no good")
  ok, err = pcall(self.pool.map, self.pool, {1, "tbl"})
  lu.assertEquals(err, {code = 42})  -- an error value raises as itself
  ok, err = pcall(self.pool.map, self.pool, {1, print, 3}, {chunksize = 3})
  lu.assertStrContains(err, "item 2: encode: cannot send a function")
  lu.assertEquals(self.pool:map({7, 8}, {chunksize = 1}), {14, 16})
end

function TestPool:test_imap_streams_in_order_or_as_they_come ()
  self.pool = prefork.pool{double, max = 2}
  local got = {}
  for i, ok, v in self.pool:imap({1, 2, "bad", 4, "tbl", 6}, {chunksize = 2}) do
    got[#got + 1] = {i, ok, v}
  end
  lu.assertEquals(got, {{1, true, 2}, {2, true, 4}, {3, false, "no good"},
                        {4, true, 8}, {5, false, {code = 42}}, {6, true, 12}})
  local seen, n = {}, 0
  for i, ok, v in self.pool:imap({1, 2, 3, 4, 5, 6, 7}, {chunksize = 2, ordered = false}) do
    lu.assertTrue(ok)
    lu.assertEquals(v, 2 * i)
    seen[i], n = true, n + 1
  end
  lu.assertEquals(n, 7)
  lu.assertEquals(H.count(seen), 7)
  -- leaving early: the pool goes on, nothing is left owed
  for i in self.pool:imap({1, 2, 3, 4, 5, 6, 7, 8}, {chunksize = 1}) do
    if i == 2 then break end
  end
  self.pool:wait()
  lu.assertEquals({self.pool:call(21)}, {true, 42})
end

function TestPool:test_map_on_async_custom_serialiser_and_dying_workers ()
  self.pool = prefork.pool{function (done, x)
    if x == "bad" then error("async no good", 0) end
    prefork.sleep(0.001)
    done(x + 1)
  end, async = true}
  lu.assertEquals(self.pool:map({1, 2, 3, 4, 5}, {chunksize = 2}), {2, 3, 4, 5, 6})
  lu.assertErrorMsgContains("item 2: async no good", self.pool.map, self.pool, {1, "bad"})
  self.pool:close()
  self.pool = prefork.pool{function (a) return math.type(a) or type(a) end, serialiser = BARS}
  lu.assertEquals(self.pool:map({1, 2, 3}, {chunksize = 2}), {"string", "string", "string"})
  self.pool:close()
  self.pool = prefork.pool{function (x)
    if x == 3 then prefork.kill(prefork.getpid(), "KILL") end
    return x
  end, max = 1}
  local ok, err = pcall(self.pool.map, self.pool, {1, 2, 3, 4}, {chunksize = 2})
  lu.assertFalse(ok)
  lu.assertStrContains(err, "item 3: pool worker")
  lu.assertStrContains(err, "(a chunk of items 3..4)")
  lu.assertEquals(self.pool:map{1, 2}, {1, 2})
end

function TestPool:test_bad_map_options_raise ()
  self.pool = prefork.pool{double}
  lu.assertErrorMsgContains("chunksize must be an integer >= 1", self.pool.map,
                            self.pool, {1}, {chunksize = 0})
  lu.assertErrorMsgContains("unknown option 'chunk'", self.pool.imap,
                            self.pool, {1}, {chunk = 2})
  lu.assertErrorMsgContains("a list expected", self.pool.map, self.pool, 5)
end

function TestPool:test_a_job_that_raises_costs_only_its_call ()
  self.pool = prefork.pool{function (x)
    if x then error("boom " .. x) end
    return prefork.getpid()
  end, max = 1}
  local ok1, p1 = self.pool:call()
  local ok, msg = self.pool:call("now")
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "boom now")
  local ok2, p2 = self.pool:call()
  lu.assertTrue(ok1 and ok2)
  lu.assertEquals(p2, p1)  -- the same worker serves on
end

function TestPool:test_an_error_value_arrives_as_itself ()
  local function job (how)
    if how == "table" then error{code = 42, why = {"nested"}} end
    if how == "number" then error(7) end
    if how == "nil" then error(nil) end
    error(setmetatable({f = print}, {__tostring = function () return "my error" end}))
  end
  self.pool = prefork.pool{job}
  lu.assertEquals({self.pool:call("table")}, {false, {code = 42, why = {"nested"}}})
  lu.assertEquals({self.pool:call("number")}, {false, 7})
  local r = table.pack(self.pool:call("nil"))
  lu.assertEquals(r, {false, nil, n = 2})
  local ok, msg = self.pool:call("function")
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "an error value that cannot be sent")
  lu.assertStrContains(msg, "cannot send a function")
  lu.assertStrContains(msg, "my error")
  -- an async job's error value too
  self.pool:close()
  self.pool = prefork.pool{function (done, x) error{x} end, async = true}
  lu.assertEquals({self.pool:call(5)}, {false, {5}})
end

function TestPool:test_a_worker_dying_mid_call_names_the_cause ()
  self.pool = prefork.pool{function (how)
    if how == "exit" then require("prefork.core").exit(3) end
    if how == "kill" then prefork.kill(prefork.getpid(), "KILL") end
    if how == "segv" then prefork.kill(prefork.getpid(), "SEGV") end
    return prefork.getpid()
  end, max = 2}
  local ok, p1 = self.pool:call()
  lu.assertTrue(ok)
  local cases = {exit = "exit 3", kill = "signal 9", segv = "signal 11"}
  for how, cause in pairs(cases) do
    local good, msg = self.pool:call(how)
    lu.assertFalse(good)
    lu.assertStrContains(msg, "died during the call")
    lu.assertStrContains(msg, cause)
  end
  -- queued calls go on, on replacements
  local res = self.pool:map{1, 2, 3, 4}
  lu.assertEquals(#res, 4)
  lu.assertEquals(H.zombies(me), 0)
end

function TestPool:test_queued_calls_survive_a_worker_killed_from_outside ()
  self.pool = prefork.pool{function (x)
    if x == 1 then prefork.sleep(10) end
    return x
  end, max = 1, load = 1}
  local answers = {}
  for i = 1, 5 do
    self.pool:call(i, function (ok, r) answers[i] = {ok, r} end)
  end
  local w = self.pool:workers()
  lu.assertEquals(#w, 1)
  prefork.kill(w[1].pid, "KILL")
  self.pool:wait()
  lu.assertFalse(answers[1][1])
  lu.assertStrContains(answers[1][2], "killed by signal 9")
  for i = 2, 5 do lu.assertEquals(answers[i], {true, i}) end
end

function TestPool:test_least_loaded_and_max ()
  local flag = newflag()
  self.pool = prefork.pool{hold, max = 3, load = 2}
  local pids = {}
  for _ = 1, 6 do
    self.pool:call(flag, function (ok, p) lu.assertTrue(ok) pids[#pids + 1] = p end)
  end
  local w = self.pool:workers()
  lu.assertEquals(#w, 3)  -- never more than max
  for _, x in ipairs(w) do lu.assertEquals(x.inflight, 2) end  -- balanced
  H.writefile(flag, "go")
  self.pool:wait()
  os.remove(flag)
  lu.assertEquals(#pids, 6)
  local per = {}
  for _, p in ipairs(pids) do per[p] = (per[p] or 0) + 1 end
  for _, n in pairs(per) do lu.assertEquals(n, 2) end
end

function TestPool:test_calls_pass_a_worker_whose_call_runs_long ()
  local flag = newflag()
  self.pool = prefork.pool{function (path)
    if path then
      local f = io.open(path .. ".started", "w") f:close()
      return hold(path)
    end
    return prefork.getpid()
  end, min = 2, max = 2}
  local holder
  self.pool:call(flag, function (_, p) holder = p end)
  H.wait_until(function () return H.readfile(flag .. ".started") end, 5, "the long call to start")
  local pids = {}
  for i = 1, 10 do self.pool:call(function (_, p) pids[i] = p end) end
  H.wait_until(function () self.pool:poll(0.05) return #pids == 10 end, 4,
               "the short calls, answered while the long one runs")
  lu.assertNil(holder)
  H.writefile(flag, "go")
  self.pool:wait()
  for _, p in ipairs(pids) do lu.assertNotEquals(p, holder) end
  os.remove(flag .. ".started")
end

function TestPool:test_min_processes_and_idle_ones_stop ()
  self.pool = prefork.pool{pid, min = 1, max = 4, idle_time = 0.2,
                           max_idle = 4, load = 1}
  lu.assertEquals(#self.pool:workers(), 1)  -- min runs from the start
  local flag = newflag()
  -- four calls in flight start four processes
  local busy = prefork.pool{hold, min = 0, max = 4, idle_time = 0.2, max_idle = 4, load = 1}
  for _ = 1, 4 do busy:call(flag, function () end) end
  lu.assertEquals(#busy:workers(), 4)
  H.writefile(flag, "go")
  busy:wait()
  os.remove(flag)
  H.wait_until(function () busy:poll(0.05) return #busy:workers() == 0 end,
               5, "idle workers to stop")
  busy:close()
  lu.assertEquals(#self.pool:workers(), 1)  -- never below min
end

function TestPool:test_max_idle_stops_the_extra_idle_ones_at_once ()
  local flag = newflag()
  local busy = prefork.pool{hold, max = 3, idle_time = 100, max_idle = 1, load = 1}
  for _ = 1, 3 do busy:call(flag, function () end) end
  lu.assertEquals(#busy:workers(), 3)
  H.writefile(flag, "go")
  busy:wait()
  os.remove(flag)
  lu.assertEquals(#busy:workers(), 1)
  busy:close()
end

function TestPool:test_template_runs_require_and_eval_init_runs_per_worker ()
  local dir = H.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. dir)
  H.writefile(dir .. "/pooltestmod.lua", [[
local M = {loadedin = require("prefork").getpid()}
function M.init () M.initin = require("prefork").getpid() end
function M.run () return M.loadedin, M.initin, EVALED, LATER end
return M]])
  package.path = dir .. "/?.lua;" .. package.path
  self.pool = prefork.pool{"pooltestmod.run", require = {"pooltestmod"},
                           eval = "EVALED = 'yes'", init = "pooltestmod.init"}
  LATER = "set after the pool was made"  -- luacheck: ignore
  local ok, loadedin, initin, evaled, later = self.pool:call()
  LATER = nil  -- luacheck: ignore
  lu.assertTrue(ok)
  lu.assertNotEquals(loadedin, me)  -- in the template, not here
  lu.assertNotEquals(initin, loadedin)  -- init in the worker itself
  lu.assertEquals(evaled, "yes")
  lu.assertNil(later)  -- the caller's later heap is not in the workers
  lu.assertNil(package.loaded.pooltestmod)  -- nor loaded here
  os.execute("rm -rf " .. dir)
end

function TestPool:test_async_worker_holds_several_calls ()
  self.pool = prefork.pool{function (done, i)
    -- each call waits for all five to be there: one worker, all at once
    N = (N or 0) + 1  -- luacheck: ignore
    for _ = 1, 500 do
      if N >= 5 then break end
      prefork.sleep(0.01)
    end
    done(i, N)
  end, async = true, max = 1, load = 5}
  local got = {}
  for i = 1, 5 do
    self.pool:call(i, function (ok, r, n) got[i] = ok and r == i and n end)
  end
  self.pool:wait()
  lu.assertEquals(got, {5, 5, 5, 5, 5})
  -- an async job that raises before done
  self.pool:close()
  self.pool = prefork.pool{function (done, x)
    if x then error("async boom", 0) end
    done("fine")
  end, async = true}
  lu.assertEquals({self.pool:call(true)}, {false, "async boom"})
  lu.assertEquals({self.pool:call()}, {true, "fine"})
end

function TestPool:test_events_reach_on_event_before_the_answer ()
  local seen = {}
  self.pool = prefork.pool{function (n)
    for i = 1, n do prefork.pool.event("progress", i) end
    return "done"
  end, on_event = function (...) seen[#seen + 1] = table.concat({...}, " ") end}
  local ok, r = self.pool:call(3)
  lu.assertTrue(ok)
  lu.assertEquals(r, "done")
  lu.assertEquals(seen, {"progress 1", "progress 2", "progress 3"})
  lu.assertErrorMsgContains("not in a pool worker", prefork.pool.event, 1)
  lu.assertErrorMsgContains("not in a pool worker", prefork.pool.retire)
end

function TestPool:test_retire_ends_the_worker_after_its_call ()
  self.pool = prefork.pool{function (leave)
    if leave then prefork.pool.retire() end
    return prefork.getpid()
  end, max = 1}
  local _, p1 = self.pool:call(true)
  local _, p2 = self.pool:call()
  lu.assertNotEquals(p1, p2)
  H.wait_until(function () return H.pstate(p1) == nil end, 5, "retired worker gone")
end

function TestPool:test_custom_serialiser_both_ways ()
  self.pool = prefork.pool{function (a, b)
    return math.type(a) or type(a), a .. b
  end, serialiser = BARS}
  -- the numbers travel as strings: the custom serialiser did it
  lu.assertEquals({self.pool:call(1, 2)}, {true, "string", "12"})
end

function TestPool:test_values_that_cannot_travel ()
  self.pool = prefork.pool{function (x)
    if x == "fn" then return print end
    return x
  end}
  local ok, msg = self.pool:call(coroutine.create(print))
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "cannot send a thread")
  ok, msg = self.pool:call("fn")
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "cannot send the results")
  ok, msg = self.pool:call(("x"):rep(prefork.pool.maxmsg + 1))
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "message too large")
  lu.assertEquals({self.pool:call({1, {2}})}, {true, {1, {2}}})
end

function TestPool:test_a_corrupt_channel_is_a_clear_error_and_a_new_worker ()
  local errors = {}
  self.pool = prefork.pool{function (corrupt)
    if corrupt then  -- write a frame header claiming 4 GiB on the channel
      local dir = "/proc/" .. prefork.getpid() .. "/fd"
      local ls = io.popen("ls " .. dir)
      local names = ls:read("a")
      ls:close()
      for name in names:gmatch("%d+") do
        local fd = tonumber(name)
        local rl = io.popen("readlink " .. dir .. "/" .. name)
        local l = rl:read("l") or ""
        rl:close()
        if fd > 2 and l:match("^socket:") then
          local c = prefork.conn(fd)
          c:write("\255\255\255\255\2\0\0\0\1")
        end
      end
      prefork.sleep(10)
    end
    return prefork.getpid()
  end, max = 1, on_error = function (m) errors[#errors + 1] = m end}
  local ok, msg = self.pool:call(true)
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "corrupt message")
  lu.assertStrContains(errors[1], "corrupt message: a frame of")
  lu.assertTrue((self.pool:call()))  -- a new worker serves
end

function TestPool:test_init_or_template_failure ()
  local errs = {}
  local ok, err = pcall(prefork.pool, {print, require = {"no.such.module"},
                        on_error = function (m) errs[#errs + 1] = m end})
  lu.assertFalse(ok)
  lu.assertStrContains(err, "template: ")
  lu.assertStrContains(err, "no.such.module")
  lu.assertStrContains(errs[1], "no.such.module")
  self.pool = prefork.pool{print, init = function () error("init broke", 0) end,
                           on_error = function (m) errs[#errs + 1] = m end}
  local good, msg = self.pool:call()
  lu.assertFalse(good)
  lu.assertStrContains(msg, "init broke")
  lu.assertStrContains(errs[2], "init broke")
end

function TestPool:test_bad_options_raise ()
  local bad = {
    {{}, "function"},
    {{print, max = "8"}, "max must be a number"},
    {{print, min = 3, max = 2}, "min must not exceed max"},
    {{print, load = 0}, "load must be at least 1"},
    {{print, bogus = 1}, "unknown option 'bogus'"},
    {{print, serialiser = {encode = print}}, "serialiser must be"},
    {{print, require = "mod"}, "require must be a list"},
    {{print, on_event = 1}, "on_event must be a function"},
  }
  for _, case in ipairs(bad) do
    lu.assertErrorMsgContains(case[2], prefork.pool, case[1])
  end
  lu.assertErrorMsgContains("a table of options", prefork.pool, "x")
  lu.assertEquals(#kids(), 0)  -- no template left behind
end

function TestPool:test_close_waits_then_nothing_is_left ()
  local destroyed = 0
  local p = prefork.pool{function (x) prefork.sleep(0.05) return x end,
                         min = 2, on_destroy = function () destroyed = destroyed + 1 end}
  local answered = 0
  for i = 1, 6 do p:call(i, function (ok) if ok then answered = answered + 1 end end) end
  lu.assertTrue(#kids() >= 3)  -- template and workers
  p:close()
  lu.assertEquals(answered, 6)
  lu.assertEquals(destroyed, 1)
  p:close()  -- again: nothing
  lu.assertEquals(destroyed, 1)
  for _, f in ipairs{p.call, p.poll, p.map, p.imap, p.with} do  -- one way
    lu.assertErrorMsgContains("attempt to use a closed pool", f, p, {})
  end
  nothingleft()
end

function TestPool:test_a_channel_decodes_the_kinds_it_is_asked_to_in_place ()
  local core = require "prefork.core"
  local a, b = prefork.socketpair()
  local tx, rx = core.chan(a), core.chan(b)
  tx:send(2, 7, prefork.encode(1, nil, {x = "y"}))
  tx:send(2, 8, "garbage")
  tx:send(3, 9, prefork.encode(5))  -- not in the mask: the string
  assert(tx:flush())
  local got = {}
  H.wait_until(function ()
    assert(rx:recv(function (...) got[#got + 1] = table.pack(...) end, 1 << 2))
    return #got == 3
  end, 5, "three frames")
  lu.assertEquals(got[1], {2, 7, true, 1, nil, {x = "y"}, n = 6})
  lu.assertEquals(got[2][3], false)
  lu.assertStrContains(got[2][4], "corrupt message: not an encoded message")
  lu.assertEquals(got[3], {3, 9, prefork.encode(5), n = 3})
  tx:close() rx:close()
end

function TestPool:test_closed_channels_and_a_reap_of_no_child_say_so ()
  local core = require "prefork.core"
  local a, b = prefork.socketpair()
  local ch = core.chan(b)
  ch:close()
  lu.assertErrorMsgContains("attempt to use a closed channel", ch.send, ch, 1, 1, "")
  lu.assertErrorMsgContains("attempt to use a closed channel", ch.recv, ch, print)
  local ep = core.epoll()
  ep:close()
  lu.assertErrorMsgContains("attempt to use a closed epoll set", ep.wait, ep, 0)
  a:close()
  -- not a child of ours: the fail triple
  local r = table.pack(core.pool_reap(1, 0))
  lu.assertNil(r[1])
  lu.assertStrContains(r[2], "wait: ")
  lu.assertEquals(r[3], 10)  -- ECHILD
end

function TestPool:test_owner_killed_leaves_no_process ()
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    local pool = prefork.pool{function () return prefork.getpid() end, min = 2}
    local _, w = pool:call()
    local ws = {}
    for _, x in ipairs(pool:workers()) do ws[#ws + 1] = x.pid end
    print("PIDS " .. table.concat(ws, " "))
    io.stdout:flush()
    prefork.sleep(30)']])
  local pids = p:expect("PIDS ([%d ]+)\n")
  local list = {}
  for x in pids:gmatch("%d+") do list[#list + 1] = tonumber(x) end
  lu.assertEquals(#list, 2)
  local tpl = H.childpids(p.pid)  -- template and workers: children of the owner
  lu.assertEquals(#tpl, 3)
  p:kill("KILL")
  p:wait()
  -- orphans come to us (a subreaper); they all leave on their own
  for _, x in ipairs(tpl) do H.reap(x, 5) end
end

--- Wait (bounded) until each pid is gone: reaped when it came to us.
local function allgone (pids, timeout, what)
  H.wait_until(function ()
    for _, x in ipairs(pids) do
      prefork.wait(x, "nohang")  -- ours once orphaned (we are a subreaper)
      if H.pstate(x) ~= nil then return false end
    end
    return true
  end, timeout or 5, what)
end

--- Every descendant of pid: a list of pids.
local function descendants (pid, out)
  out = out or {}
  for _, c in ipairs(H.childpids(pid)) do
    out[#out + 1] = c
    descendants(c, out)
  end
  return out
end

function TestPool:test_owner_killed_while_busy_ends_every_pool_process ()
  local flag = newflag()
  local p = H.spawn(H.lua .. ([[ -e '
    local prefork = require "prefork"
    local pool = prefork.pool{function (how)
      local f = io.open("%s" .. prefork.getpid(), "w") f:close()
      if how == "spin" then while true do end end
      os.execute("sleep 1000")
    end, min = 2, max = 2, load = 1}
    pool:call("spin", function () end)
    pool:call("sleep", function () end)
    print("TPL " .. pool.tpid)
    io.stdout:flush()
    pool:wait()']]):format(flag))
  local tpid = tonumber(p:expect("TPL (%d+)\n"))
  local pids
  H.wait_until(function ()  -- both jobs running, sh and sleep started
    pids = descendants(p.pid)
    local sleeping = false
    for _, x in ipairs(pids) do
      if H.cmdline(x):match("^sleep 1000") then sleeping = true end
    end
    return sleeping and #pids == 5
  end, 10, "the jobs to be busy")
  p:kill("KILL")
  p:wait()
  local ok, err = pcall(allgone, pids, 5, "every pool process to end")
  for _, x in ipairs(pids) do  -- what a failure left behind
    os.remove(flag .. x)
    if not ok then H.kill(x, "KILL") end
  end
  if not ok then allgone(pids) error(err, 0) end
  lu.assertNil(H.pstate(tpid))
end

--- A job that hangs in a child process when x is "hang" (the child's pid
-- written to path first); returns x otherwise.
local function hangs (x, path)
  if x == "hang" then os.execute("echo $$ >" .. path .. "; exec sleep 1000") end
  return x
end

function TestPool:test_a_call_past_its_timeout_fails_and_the_calls_behind_it_go_on ()
  local path = H.tmpname()
  self.pool = prefork.pool{hangs, max = 1, load = 4, timeout = 0.3}
  local got = {}
  for i, x in ipairs{"a", "hang", "b", "c"} do
    self.pool:call(x, path, function (...) got[i] = {...} end)
  end
  self.pool:wait()
  lu.assertEquals(got, {{true, "a"}, {false, "timeout after 0.3 s"},
                        {true, "b"}, {true, "c"}})
  -- what the job started went with its worker
  allgone({tonumber(H.readfile(path))}, 5, "the job's child to end")
  -- a per-call limit, on a pool without one
  self.pool:close()
  self.pool = prefork.pool{hangs, max = 1}
  local quick = self.pool:with{timeout = 0.2}
  lu.assertEquals({quick:call("hang", path)}, {false, "timeout after 0.2 s"})
  lu.assertEquals({quick:call("fine", path)}, {true, "fine"})
  lu.assertEquals({self.pool:call("plain", path)}, {true, "plain"})
  allgone({tonumber(H.readfile(path))}, 5, "the job's child to end")
  self.pool:close()  -- an async pool's calls with a limit
  self.pool = prefork.pool{function (done, x) done(x) end, async = true, timeout = 5}
  lu.assertEquals({self.pool:call(1)}, {true, 1})
end

function TestPool:test_close_with_a_time_limit_cuts_a_hung_call_off ()
  local path = H.tmpname()
  local destroyed = false
  local p = prefork.pool{hangs, on_destroy = function () destroyed = true end}
  local got
  p:call("hang", path, function (...) got = {...} end)
  p:call("quick", path, function () end)
  lu.assertEquals({p:close(0.3)}, {nil, "1 calls cut off after 0.3 s"})
  lu.assertEquals(got, {false, "pool closed: no answer after 0.3 s"})
  lu.assertTrue(destroyed)
  allgone({tonumber(H.readfile(path))}, 5, "the job's child to end")
  nothingleft()
end

function TestPool:test_bad_timeouts_raise ()
  lu.assertErrorMsgContains("timeout must be a number > 0", prefork.pool,
                            {print, timeout = 0})
  self.pool = prefork.pool{print}
  lu.assertErrorMsgContains("timeout must be a number > 0", self.pool.with,
                            self.pool, {timeout = "1"})
  lu.assertErrorMsgContains("unknown option 'time'", self.pool.with,
                            self.pool, {time = 1})
  lu.assertErrorMsgContains("timeout must be a number > 0", self.pool.close,
                            self.pool, -1)
end

function TestPool:test_awaited_call_yields_inside_serve ()
  local flag = newflag()
  local m = H.master(([[
local pool
prefork.start{listen = "127.0.0.1:0", workers = 1, on_start = announce,
  fork = function (w)
    pool = prefork.pool{function (path)
      local f = io.open(path .. ".started", "w") f:close()
      for _ = 1, 500 do
        local f = io.open(path) if f then f:close() return "released" end
        prefork.sleep(0.01)
      end
      return "never released"
    end}
    w:serve(function (c)
      local line = c:read("l")
      if line == "wait" then
        local ok, r = pool:call(%q)
        c:write(r .. "\n")
      else
        local f = io.open(%q, "w") f:write("x") f:close()
        c:write("set\n")
      end
    end)
  end}]]):format(flag, flag))
  local a = H.connect(m.port)
  a:send("wait\n")
  H.wait_until(function () return H.readfile(flag .. ".started") end, 5,
               "the pool call to start")
  -- the worker serves this one while the first waits on the pool
  lu.assertEquals(H.request(m.port, "set\n"), "set\n")
  a:settimeout(10)
  lu.assertEquals(a:receive("*l"), "released")
  a:close()
  os.remove(flag)
  os.remove(flag .. ".started")
end

function TestPool:test_a_pool_holds_no_fd_of_another_pool_or_connection ()
  local a = prefork.pool{pid, min = 1}
  local c1, c2 = prefork.socketpair()
  self.pool = prefork.pool{pid, min = 1}
  -- B's processes hold only B's own channel: A's and the pair are
  -- /dev/null there, so A's workers see EOF when A closes
  local function sockets (p)
    local n = 0
    for t in pairs(H.fdtargets(p)) do
      if t:match("^socket:") then n = n + 1 end
    end
    return n
  end
  lu.assertEquals(sockets(self.pool.tpid), 1)  -- its control socket
  lu.assertEquals(sockets(self.pool:workers()[1].pid), 1)  -- its channel
  local apids = {a.tpid, a:workers()[1].pid}
  a:close()
  for _, p in ipairs(apids) do lu.assertNil(H.pstate(p)) end
  c1:close() c2:close()
end

function TestPool:test_the_template_killed_fails_calls_and_never_hangs ()
  local errs = {}
  self.pool = prefork.pool{pid, on_error = function (m) errs[#errs + 1] = m end}
  prefork.kill(self.pool.tpid, "KILL")
  prefork.wait(self.pool.tpid)
  local ok, msg = self.pool:call()
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "pool template")
  lu.assertStrContains(errs[1], "pool template")
  ok, msg = self.pool:call()  -- at once, the same way
  lu.assertFalse(ok)
  lu.assertStrContains(msg, "pool template")
end

function TestPool:test_an_awaited_call_inside_a_callback ()
  self.pool = prefork.pool{function (x) return x end, max = 1, load = 2}
  local got = {}
  self.pool:call(1, function (_, r)
    got[#got + 1] = r
    local _, three = self.pool:call(3)
    got[#got + 1] = three
  end)
  self.pool:call(2, function (_, r) got[#got + 1] = r end)
  self.pool:call(4, function (_, r) got[#got + 1] = r end)
  self.pool:wait()
  table.sort(got)
  lu.assertEquals(got, {1, 2, 3, 4})
end

function TestPool:test_workers_draw_different_random_numbers ()
  self.pool = prefork.pool{function () return math.random(1 << 40) end,
                           min = 3, max = 3, load = 1}
  local seen = {}
  for _, x in ipairs(self.pool:map{1, 2, 3}) do seen[x] = true end
  lu.assertEquals(H.count(seen), 3)
end

os.exit(lu.LuaUnit.run())
