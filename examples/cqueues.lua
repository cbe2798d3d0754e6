#!/usr/bin/env lua5.4
-- examples/cqueues.lua [PORT]: a cqueues loop in each worker, accepting on
-- the worker's listener; each connection is a coroutine of its own. A
-- client sends a line and gets it back in capitals; "wait N" is answered
-- after N seconds, while the worker goes on serving others.
--   lua5.4 examples/cqueues.lua 8082
--   lua5.4 -e 'local s = require"socket".connect("127.0.0.1", 8082) s:send("hi\n") print((s:receive()))'
--
-- cqueues gets a copy of the listener's fd (prefork.socket.dup): it keeps
-- the fd in its own epoll set, and the worker's stop replaces the
-- worker's own fd. The stop reaches the loop as a signal: TERM and INT
-- are blocked and read through cqueues.signal (a signalfd); the loop then
-- stops accepting, lets its connections finish, and the worker exits.

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"
local cqueues = require "cqueues"
local condition = require "cqueues.condition"
local csocket = require "cqueues.socket"
local signal = require "cqueues.signal"

local function serve (cq, client)
  client:settimeout(10)
  client:setmode("t", "b")  -- (text mode would write "\n" as "\r\n")
  local line = client:read("*l")
  local wait = line and tonumber(line:match("^wait (%d+%.?%d*)$"))
  if wait then cqueues.sleep(wait) end
  if line then client:write(line:upper(), "\n") end
  client:close()
end

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or 2,
  listen = "127.0.0.1:" .. (arg[1] or 8082),
  on_start = function (master)
    print("cqueues example listening on " .. master:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    signal.block(signal.SIGTERM, signal.SIGINT)
    local stop = signal.listen(signal.SIGTERM, signal.SIGINT)
    local server = csocket.fdopen(assert(prefork.socket.dup(worker.listeners[1])))
    local cq = cqueues.new()
    local stopping, stopped = false, condition.new()
    cq:wrap(function ()
      stop:wait()
      stopping = true
      stopped:signal()
    end)
    cq:wrap(function ()
      while true do
        cqueues.poll({pollfd = server:pollfd(), events = "r"}, stopped)
        if stopping then break end
        local client = server:accept(0)  -- nil: another worker took it
        if client then cq:wrap(serve, cq, client) end
      end
      server:close()
    end)
    worker:ready()
    assert(cq:loop())
  end,
}
