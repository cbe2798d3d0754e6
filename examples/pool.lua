-- The process pool: the synopsis of AnyEvent::Fork::Pool in Lua.
-- Ten calls go to a pool of worker processes, each prints what its call
-- returned; then the pool is closed and on_destroy awaited.
--   lua5.4 examples/pool.lua

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

local destroyed = false
local pool = prefork.pool{
  -- the job, run in the workers; a name ("mymod.run") works too
  function (what, n)
    return what .. " " .. n .. " in " .. prefork.getpid(), n * n
  end,
  -- every knob at its default
  min = 0, max = 8, busy_time = 0, max_idle = 1, idle_time = 1, load = 32,
  require = {"string"},  -- modules loaded once, in the template process
  eval = "collectgarbage()",  -- code run there too
  on_error = function (msg) io.stderr:write("pool error: ", msg, "\n") end,
  on_event = function (...) print("event", ...) end,
  on_destroy = function () destroyed = true end,
}

for i = 1, 10 do
  pool:call("doit", i, function (ok, msg, square)
    print("returned", ok, msg, square)
  end)
end

pool:close()  -- waits for the ten answers, then for on_destroy
print("destroyed", destroyed)
