#!/usr/bin/env lua5.4
-- examples/echo.lua [PORT]: the preforking server of the SBCL example
-- (seed 001), port 1978 by default. Eight workers accept on one socket;
-- a client sends its id on a line and a message on the next, and gets
--   Hello <id>, this is PID <pid>
--   <message>
-- before the server closes the connection. Try:
--   lua5.4 -e 'local s = require"socket".connect("127.0.0.1", 1978) s:send("me\nhi\n") print((s:receive("*a")))'

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

prefork.start{
  workers = 8,
  listen = "127.0.0.1:" .. (arg[1] or 1978),
  on_start = function (master)
    print("echo server listening on " .. master:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    for conn in worker:connections() do
      conn:settimeout(10)  -- a silent client does not hold a worker forever
      local id = conn:read("l")
      local message = id and conn:read("l")
      if message then
        conn:write(("Hello %s, this is PID %d\n%s\n"):format(
                   id, prefork.getpid(), message))
      end
      conn:close()
    end
  end,
}
