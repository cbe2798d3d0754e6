#!/usr/bin/env lua5.4
-- examples/tls.lua [PORT [CERT KEY]]: LuaSec TLS on the connections of
-- worker:serve. A client sends a line over TLS and gets it back in
-- capitals. Each connection is detached from prefork (conn:detach), given
-- to LuaSec with a time limit of 0, and wherever LuaSec would block
-- (handshake, receive, send) the coroutine waits with prefork.wait_fd: the
-- worker's other connections go on meanwhile, as for plain connections.
--   openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -days 30 -subj /CN=localhost
--   lua5.4 examples/tls.lua 8443 cert.pem key.pem
--   echo hello | openssl s_client -quiet -connect 127.0.0.1:8443

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"
local socket = require "socket"
local ssl = require "ssl"

local CERT, KEY = arg[2] or "cert.pem", arg[3] or "key.pem"

-- a LuaSec call at time limit 0: its result, waiting the prefork way
-- while it says it would block ("wantread", "wantwrite", "timeout")
local function tls (s, method, ...)
  while true do
    local r, err, partial = s[method](s, ...)
    if r or (err ~= "wantread" and err ~= "wantwrite" and err ~= "timeout") then
      return r, err, partial
    end
    local ok, why = prefork.wait_fd(s:getfd(), err == "wantwrite" and "w" or "r", 10)
    if not ok then return nil, why end
  end
end

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or 2,
  listen = "127.0.0.1:" .. (arg[1] or 8443),
  on_start = function (master)
    print("TLS example listening on " .. master:addresses()[1])
    io.stdout:flush()
  end,
  fork = function (worker)
    local ctx = assert(ssl.newcontext{mode = "server", protocol = "any",
      certificate = CERT, key = KEY, options = {"all", "no_sslv2", "no_sslv3"}})
    worker:serve(function (conn)
      local fd = conn:detach()  -- (nothing read yet: a TLS client speaks first)
      local raw = socket.tcp()
      raw:close()  -- (its own fd)
      raw:setfd(fd)
      local s = assert(ssl.wrap(raw, ctx))
      s:settimeout(0)
      local line = tls(s, "dohandshake") and tls(s, "receive", "*l")
      if line then tls(s, "send", line:upper() .. "\n") end
      s:close()
    end)
  end,
}
