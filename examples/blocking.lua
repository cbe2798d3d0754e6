#!/usr/bin/env lua5.4
-- examples/blocking.lua [PORT]: a blocking C call (a database driver
-- without non-blocking I/O, say) inside worker:serve. Run directly it
-- would stop every connection of the worker while it waits; through a
-- prefork.pool it runs in a pool process, and the handler's awaited call
-- yields, so the worker's other connections go on. load = 1: a pool
-- process takes one call at a time, as a blocking driver needs.
-- A client sends a number of seconds; the "query" (LuaSocket's blocking
-- socket.sleep standing in for the driver) takes that long, and the answer
-- names the pool process and the most calls this worker has had under
-- way at once.
--   lua5.4 examples/blocking.lua 8084
--   lua5.4 -e 'local s = require"socket".connect("127.0.0.1", 8084) s:send("1\n") print((s:receive()))'

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

-- the blocking call, run in a pool process
local function query (seconds)
  require("socket").sleep(seconds)
  return prefork.getpid()
end

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or 2,
  listen = "127.0.0.1:" .. (arg[1] or 8084),
  on_start = function (master)
    print("blocking-driver example listening on " .. master:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    local pool = prefork.pool{query, min = 1, max = 8, load = 1}
    local busy, most = 0, 0
    worker:serve(function (conn)
      conn:settimeout(10)
      local seconds = tonumber(conn:read("l"))
      if not seconds or seconds < 0 or seconds > 60 then
        conn:write("a number of seconds, please\n")
        return
      end
      busy = busy + 1
      most = math.max(most, busy)
      local ok, pid = pool:call(seconds)  -- yields; others are served
      busy = busy - 1
      conn:write(ok and ("done by pool process %d; %d at once\n"):format(pid, most)
                 or ("failed: " .. tostring(pid) .. "\n"))
    end)
  end,
}
