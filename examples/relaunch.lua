#!/usr/bin/env lua5.4
-- examples/relaunch.lua [PORT [CONFIG]]: the relaunch tutorial of Haskell's
-- System.Prefork (seed 000), port 8081 by default. `update` reads CONFIG
-- (a Lua file, by default examples/relaunch.conf.lua) and returns the
-- configuration and the worker
-- set: one context per worker, each with its own id. Edit the file and
-- send SIGHUP to the master: workers whose context changed are replaced
-- (the new one first), removed ones drain, unchanged ones keep running.
-- Each worker answers a connection with its greeting, id and PID.

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

local config_file = arg[2] or (here .. "examples/relaunch.conf.lua")

-- the configuration and one context per worker; nil, err for a bad file
local function update ()
  local conf = {greetings = {}}
  local chunk, err = loadfile(config_file, "t", conf)
  if not chunk then return nil, err end
  chunk()
  if math.type(conf.workers) ~= "integer" then
    return nil, config_file .. ": workers must be an integer"
  end
  local workers = {}
  for i = 1, conf.workers do
    workers[i] = {id = i, greeting = conf.greetings[i] or conf.greeting}
  end
  return {file = config_file}, workers
end

prefork.start{
  listen = "127.0.0.1:" .. (arg[1] or 8081),
  update = update,
  on_start = function (master)
    print(("relaunch server on %s; edit %s and send SIGHUP to %d"):format(
          master:addresses()[1], config_file, prefork.getpid()))
    io.stdout:flush()
  end,
  on_reload = function (master, ok, err)
    print(ok and "reloaded" or ("reload failed: " .. err))
    io.stdout:flush()
  end,
  fork = function (worker)
    print(("worker %d up: pid %d, greeting %q"):format(
          worker.id, prefork.getpid(), worker.context.greeting))
    io.stdout:flush()
    for conn in worker:connections() do
      conn:write(("%s from worker %d (pid %d)\n"):format(
                 worker.context.greeting, worker.id, prefork.getpid()))
      conn:close()
    end
  end,
}
