#!/usr/bin/env lua5.4
-- bench/hello.lua PORT [WORKERS [DELAY]]: the fixed hello handler of the
-- benchmarks and chaos runs. Answers every request with the 13-byte body
-- "Hello, World!" (nginx's `return 200 "Hello, World!"`), then closes:
-- the blocking worker of this version serves one connection at a time.
-- DELAY (seconds) is slept after the first byte of the answer, to give
-- chaos runs work in flight. The update hook hands out a new config on
-- each SIGHUP, so every reload replaces every worker.
-- QUIET=1 silences the log; PRELOAD_MB=N makes an N MB Lua heap in the
-- master before the fork; FULLGC=1 runs a full collection in each worker
-- first (the worst case for copy-on-write).

local here = arg[0]:match("^(.-)[^/]*$") .. "../"
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

local port = arg[1] or "8080"
local delay = tonumber(arg[3] or 0)
local sleep = delay > 0 and require("socket").sleep

local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
  .. "Content-Length: 13\r\nConnection: close\r\n\r\nHello, World!"

-- PRELOAD_MB: a Lua heap of that size made in the master before the
-- fork, as an application's data would be (the memory case)
local preload, mb = {}, tonumber(os.getenv("PRELOAD_MB")) or 0
while collectgarbage("count") < mb * 1024 do
  preload[#preload + 1] = ("%099d"):format(#preload)
end

local generation = 0

prefork.start{
  workers = tonumber(arg[2] or 2),
  listen = "127.0.0.1:" .. port,
  log = os.getenv("QUIET") and function () end or nil,
  update = function ()
    generation = generation + 1
    return {generation = generation}
  end,
  on_start = function (m)
    print("listening " .. m:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    if os.getenv("FULLGC") == "1" then collectgarbage() end  -- worst case
    for conn in worker:connections() do
      conn:settimeout(10)
      local line = conn:read("l")
      while line and line ~= "\r" and line ~= "" do line = conn:read("l") end
      if line then
        if sleep then
          conn:write("H")
          sleep(delay)
          conn:write(RESPONSE:sub(2))
        else
          conn:write(RESPONSE)
        end
      end
      conn:close()
    end
  end,
}
