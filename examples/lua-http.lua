#!/usr/bin/env lua5.4
-- examples/lua-http.lua [PORT]: lua-http's HTTP/1.1 and HTTP/2 server in
-- each worker, on the worker's listener; each request is answered with
-- its method, path and the worker's pid.
--   lua5.4 examples/lua-http.lua 8083
--   curl http://127.0.0.1:8083/hello
--
-- Debian packages lua-http (and its pure-Lua dependencies basexx, fifo,
-- lpeg_patterns, binaryheap) for Lua 5.1-5.3 only, but they are pure Lua:
-- the 5.3 and 5.2 directories go on package.path below; the C parts it
-- needs (cqueues, luaossl, lpeg) are packaged for 5.4. As in
-- examples/cqueues.lua, lua-http gets a copy of the listener's fd and
-- hears the stop through cqueues.signal; at the stop it closes its
-- listener and connections.

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath
for _, v in ipairs{"5.3", "5.2"} do
  package.path = package.path .. ";/usr/share/lua/" .. v .. "/?.lua;"
                 .. "/usr/share/lua/" .. v .. "/?/init.lua"
end

local prefork = require "prefork"
local csocket = require "cqueues.socket"
local signal = require "cqueues.signal"
local http_server = require "http.server"
local http_headers = require "http.headers"

local function onstream (_, stream)
  local req = assert(stream:get_headers())
  local h = http_headers.new()
  h:append(":status", "200")
  h:append("content-type", "text/plain")
  stream:write_headers(h, false)
  stream:write_chunk(("%s %s from pid %d\n"):format(req:get(":method"),
                     req:get(":path"), prefork.getpid()), true)
end

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or 2,
  listen = "127.0.0.1:" .. (arg[1] or 8083),
  on_start = function (master)
    print("lua-http example on http://" .. master:addresses()[1] .. "/")
    io.stdout:flush()
  end,
  fork = function (worker)
    signal.block(signal.SIGTERM, signal.SIGINT)
    local stop = signal.listen(signal.SIGTERM, signal.SIGINT)
    local server = assert(http_server.new{
      socket = csocket.fdopen(assert(prefork.socket.dup(worker.listeners[1]))),
      tls = false,
      onstream = onstream,
    })
    server.cq:wrap(function ()
      stop:wait()
      server:close()
    end)
    worker:ready()
    assert(server:loop())
  end,
}
