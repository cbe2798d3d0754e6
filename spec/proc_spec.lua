-- The low-level process interface: prefork.fork, wait, kill, signal names.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"

TestProc = {}

function TestProc:tearDown () H.cleanup() end


function TestProc:test_fork_runs_fn_with_its_arguments_and_exits_0 ()
  local out = H.tmpname()
  local pid = prefork.fork(function (path, a, b)
    local f = io.open(path, "w")
    f:write(a + b)
    f:close()
  end, out, 2, 40)
  lu.assertEquals(math.type(pid), "integer")
  lu.assertEquals({prefork.wait(pid)}, {pid, "exit", 0})
  lu.assertEquals(H.readfile(out), "42")
end


function TestProc:test_the_traceback_reaches_stderr ()
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    local pid = prefork.fork(function () error("deep trouble") end)
    print(prefork.wait(pid))']])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrMatches(p:out(), "%d+\texit\t1\n")
  lu.assertStrContains(p:err(), "deep trouble")
  lu.assertStrContains(p:err(), "stack traceback")
end


function TestProc:test_os_exit_code_and_signals_are_reported ()
  -- (luaunit replaces os.exit while it runs tests: a process of its own)
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    local pid = prefork.fork(function () os.exit(3) end)
    print(select(2, prefork.wait(pid)))']])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertEquals(p:out(), "exit\t3\n")
  local pid = prefork.fork(function () require("socket").sleep(10) end)
  lu.assertEquals(prefork.wait(pid, "nohang"), nil)
  lu.assertEquals(select(2, prefork.wait(pid, "nohang")), "running")
  lu.assertTrue(prefork.kill(pid, "KILL"))
  lu.assertEquals({prefork.wait(pid)}, {pid, "signal", 9})
  pid = prefork.fork(function () require("socket").sleep(10) end)
  lu.assertTrue(prefork.kill(pid, "SIGTERM"))
  lu.assertEquals({prefork.wait(pid)}, {pid, "signal", 15})
  pid = prefork.fork(function () require("socket").sleep(10) end)
  lu.assertTrue(prefork.kill(pid))  -- TERM by default
  lu.assertEquals({prefork.wait()}, {pid, "signal", 15})
end


function TestProc:test_failures_return_the_fail_triple ()
  local ok, msg, errno = prefork.wait(1)  -- not our child
  lu.assertNil(ok)
  lu.assertEquals(msg, "wait: No child processes")
  lu.assertEquals(errno, 10)
  ok, msg, errno = prefork.kill(2 ^ 22 + 12345, 0)
  lu.assertNil(ok)
  lu.assertEquals(msg, "kill: No such process")
  lu.assertEquals(errno, 3)
end


function TestProc:test_misuse_raises ()
  lu.assertErrorMsgContains("unknown signal 'NOPE'", prefork.kill, 1, "NOPE")
  lu.assertErrorMsgContains("no such signal", prefork.kill, 1, 999)
  lu.assertErrorMsgContains("function expected", prefork.fork, 42)
  lu.assertErrorMsgContains("invalid option 'later'", prefork.wait, -1, "later")
  lu.assertErrorMsgContains("number expected", prefork.wait, "x")
end


function TestProc:test_signal_names ()
  lu.assertEquals(prefork.signame(15), "TERM")
  lu.assertEquals(prefork.signame(1), "HUP")
  lu.assertNil(prefork.signame(0))
end


function TestProc:test_output_buffered_before_fork_appears_once ()
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    io.write("before ")  -- buffered, not flushed, when the fork comes
    local pid = prefork.fork(function () io.write("child ") end)
    prefork.wait(pid)
    io.write("after\n")']])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertEquals(p:out(), "before child after\n")
end


function TestProc:test_child_never_returns_into_the_caller ()
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    local pid = prefork.fork(function () end)
    print("parent only", (select(2, prefork.wait(pid))))']])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertEquals(p:out(), "parent only\texit\n")
end


function TestProc:test_child_has_default_signal_handling_and_empty_mask ()
  lu.skipIf(H.valgrind, "valgrind catches every signal itself")
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    local pid = prefork.fork(function ()
      local s = io.open("/proc/self/status"):read("a")
      print(s:match("SigBlk:%s*(%x+)"), s:match("SigCgt:%s*(%x+)"))
    end)
    prefork.wait(pid)']])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertEquals(p:out(), "0000000000000000\t0000000000000000\n")
end


function TestProc:test_getpid_and_settitle ()
  lu.skipIf(H.valgrind, "under valgrind argv is the tool's: titles are left alone")
  local p = H.spawn(H.lua .. [[ -e '
    local prefork = require "prefork"
    prefork.settitle("a title of some length, longer than argv was")
    print(prefork.getpid()) io.stdout:flush()
    require("socket").sleep(10)']])
  local pid = tonumber(p:expect("(%d+)\n"))
  lu.assertEquals(pid, p.pid)
  lu.assertEquals(H.cmdline(p.pid), "a title of some length, longer than argv was")
  lu.assertEquals(H.readfile("/proc/" .. p.pid .. "/comm"), "a title of some\n")
end


os.exit(lu.LuaUnit.run())
