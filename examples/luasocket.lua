#!/usr/bin/env lua5.4
-- examples/luasocket.lua [PORT]: LuaSocket's own accept loop in each
-- worker, on the worker's listener (prefork.socket.server). A client sends
-- a line and gets it back in capitals. The loop blocks in LuaSocket's
-- accept with no time limit: a graceful stop (TERM, a reload) makes that
-- accept fail at once, and the loop sees worker:stopping() and ends.
--   lua5.4 examples/luasocket.lua 8081
--   lua5.4 -e 'local s = require"socket".connect("127.0.0.1", 8081) s:send("hi\n") print((s:receive()))'

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or 2,
  listen = "127.0.0.1:" .. (arg[1] or 8081),
  on_start = function (master)
    print("luasocket example listening on " .. master:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    local server = assert(prefork.socket.server(worker.listeners[1]))
    worker:ready()  -- (no accept of ours tells the master)
    while not worker:stopping() do
      local client = server:accept()  -- nil, "invalid argument" at a stop
      if client then
        client:settimeout(10)
        local line = client:receive("*l")
        if line then client:send(line:upper() .. "\n") end
        client:close()
      end
    end
  end,
}
