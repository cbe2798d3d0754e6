-- prefork.start's setup: every misuse and every setup failure raises a
-- clear error naming the option, and leaves nothing bound or forked.

local lu = require "luaunit"
local H = require "helpers"
local prefork = require "prefork"

local function fork () end
local me = prefork.getpid()

--- Call prefork.start(opts); it must raise with msg in the message and
-- leave no child, no fd behind.
local function fails (msg, opts)
  collectgarbage()
  local fds = H.fdcount(me)
  local ok, err = pcall(prefork.start, opts)
  lu.assertFalse(ok)
  lu.assertStrContains(err, msg)
  collectgarbage()
  lu.assertEquals(H.fdcount(me), fds)
  lu.assertEquals(H.childpids(me), {})
  return err
end

TestOptions = {}

function TestOptions:test_options_must_be_a_table ()
  fails("prefork.start: options must be a table (got nil)", nil)
  fails('options must be a table (got "workers=2")', "workers=2")
end

function TestOptions:test_unknown_options_are_named ()
  fails("unknown option 'wrokers'", {wrokers = 2, fork = fork})
  fails("unknown option '1'", {"x", fork = fork})
end

function TestOptions:test_wrong_types_name_the_option ()
  fails([[prefork.start: workers must be a positive integer (got "2")]],
        {workers = "2", fork = fork})
  fails("prefork.start: workers must be a positive integer (got 1.5)",
        {workers = 1.5, fork = fork})
  fails("workers must be a positive integer (got -1)", {workers = -1, fork = fork})
  fails("workers must be a positive integer (got 0)", {workers = 0, fork = fork})
  fails("prefork.start: fork must be a function (got a table)", {fork = {}})
  fails("update must be a function", {update = 1, fork = fork})
  fails("on_start must be a function", {on_start = true, fork = fork})
  fails("graceful_timeout must be a number >= 0",
        {graceful_timeout = -1, fork = fork})
  fails("title must be a string", {title = 3, fork = fork})
  fails("backlog must be a positive integer (got 0)", {backlog = 0, fork = fork})
  fails("defer_accept must be an integer >= 0",
        {defer_accept = "yes", fork = fork})
  fails("listen must be an address or a list of addresses (got true)",
        {listen = true, fork = fork})
  fails("listen must be a list of addresses (item 2 is a table)",
        {listen = {"127.0.0.1:0", {}}, fork = fork})
  fails([[accept must be "shared", "reuseport", "mutex" or "master"]],
        {accept = "magic", fork = fork})
end

function TestOptions:test_fork_is_required ()
  fails("option 'fork' (the worker's body) is required", {workers = 1})
end

function TestOptions:test_bad_addresses_name_the_item ()
  fails([[listen[1] "127.0.0.1:99999": bad address '127.0.0.1:99999' (bad port '99999')]],
        {listen = "127.0.0.1:99999", fork = fork})
  fails([[listen[2] "::1:80"]], {listen = {"127.0.0.1:0", "::1:80"}, fork = fork})
end

function TestOptions:test_port_in_use_unbinds_what_was_bound ()
  local busy = assert(prefork.listen("127.0.0.1:0"))
  local err = fails("bind: Address already in use",
                    {listen = {"127.0.0.1:0", "[::1]:0", busy:address()},
                     fork = fork})
  lu.assertStrContains(err, "listen[3]")
  busy:close()
end

function TestOptions:test_first_update_failure_raises ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local addr = l:address()
  l:close()
  fails("update failed: no config today",
        {listen = addr, fork = fork,
         update = function () return nil, "no config today" end})
  lu.assertStrContains(fails("update failed: ", {listen = addr, fork = fork,
        update = function () error("exploded") end}), "exploded")
  fails("update failed: update returned nil",
        {listen = addr, fork = fork, update = function () end})
  fails("context 2 repeats the id 1", {listen = addr, fork = fork,
        update = function () return {}, {{id = 1}, {id = 1}} end})
  fails("context 1 has no id", {listen = addr, fork = fork,
        update = function () return {}, {{name = "x"}} end})
  fails("context 1 is a string", {listen = addr, fork = fork,
        update = function () return {}, {"x"} end})
  -- the address is free again: nothing kept it
  assert(prefork.listen(addr)):close()
end

function TestOptions:test_errors_point_at_the_caller ()
  local ok, err = pcall(function () prefork.start{bogus = 1} end)
  lu.assertFalse(ok)
  lu.assertStrMatches(err, "spec/options_spec.lua:%d+: prefork.start: unknown option 'bogus'")
end

function TestOptions:test_set_workers_misuse ()
  local p = H.master([[
prefork.start{workers = 1, listen = "127.0.0.1:0",
  on_start = function (m)
    print(pcall(m.set_workers, m, -1)) print(pcall(m.set_workers, m, "x"))
    announce(m) m:stop()
  end,
  fork = function (w) for c in w:connections() do c:close() end end}
]])
  lu.assertEquals({p:wait(5)}, {"exit", 0})
  lu.assertStrContains(p:out(), "false\t")
  lu.assertStrContains(p:out(), "master:set_workers: n must be an integer >= 0 (got -1)")
  lu.assertStrContains(p:out(), "master:set_workers: n must be an integer >= 0 (got x)")
  H.cleanup()
end

os.exit(lu.LuaUnit.run())
