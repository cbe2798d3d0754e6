-- prefork.start inside test runners: a forked worker never returns into
-- the runner, so its report and exit code appear once.

local lu = require "luaunit"
local H = require "helpers"

local function run (cmd, fail)
  local p = H.spawn((fail and "env FIXTURE_FAIL=1 " or "") .. cmd)
  local how, code = p:wait(30)
  return p:out() .. p:err(), how, code
end

local function count (s, what)
  local _, n = s:gsub(what:gsub("%p", "%%%0"), "")
  return n
end

TestRunners = {}

function TestRunners:tearDown () H.cleanup() end

function TestRunners:test_luaunit ()
  local out, how, code = run(H.lua .. " spec/fixtures/luaunit_start.lua")
  lu.assertEquals({how, code}, {"exit", 0}, out)
  lu.assertEquals(count(out, "Ran 2 tests"), 1, out)
  lu.assertEquals(count(out, "NEXT-TEST"), 1, out)
  lu.assertEquals(count(out, "BUFFERED-BEFORE-START"), 1, out)
  lu.assertEquals(count(out, "worker 1 ran"), 1, out)
  lu.assertEquals(count(out, "worker 2 ran"), 1, out)
end

function TestRunners:test_luaunit_failure_exit_code ()
  local out, how, code = run(H.lua .. " spec/fixtures/luaunit_start.lua", true)
  lu.assertEquals({how, code}, {"exit", 1}, out)
  lu.assertEquals(count(out, "Ran 3 tests"), 1, out)
  lu.assertEquals(count(out, "1 failure"), 1, out)
end

function TestRunners:test_busted ()
  local out, how, code = run(H.lua .. " /usr/bin/busted -o plainTerminal "
                             .. "spec/fixtures/busted_start.lua")
  lu.assertEquals({how, code}, {"exit", 0}, out)
  lu.assertEquals(count(out, "2 successes / 0 failures / 0 errors"), 1, out)
  lu.assertEquals(count(out, "NEXT-TEST"), 1, out)
  lu.assertEquals(count(out, "worker 1 ran"), 1, out)
end

function TestRunners:test_busted_failure_exit_code ()
  local out, how, code = run(H.lua .. " /usr/bin/busted -o plainTerminal "
                             .. "spec/fixtures/busted_start.lua", true)
  lu.assertEquals({how, code}, {"exit", 1}, out)
  lu.assertEquals(count(out, "2 successes / 1 failure / 0 errors"), 1, out)
end

os.exit(lu.LuaUnit.run())
