#!/usr/bin/env lua5.4
-- examples/tls.lua [PORT [CERT KEY]]: LuaSec TLS on the connections of
-- worker:serve. A client sends lines over TLS and gets each back in
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

-- LuaSec at time limit 0 says "wantread" or "wantwrite" where it would
-- block: the coroutine then waits the prefork way, at most LIMIT seconds.
-- An idle wait (for a client's first bytes, or for its next line after an
-- answer) ends at a graceful stop, after a last second, with nil,
-- "stopping"; a wait in the middle of a handshake or of a line does not.
local LIMIT = 30

local function blocked (err)
  return err == "wantread" or err == "wantwrite" or err == "timeout"
end

local function wait (s, err, idle)
  return prefork.wait_fd(s:getfd(), err == "wantwrite" and "w" or "r", LIMIT, idle)
end

local function handshake (s)
  local ok, why = wait(s, "wantread", true)  -- the client speaks first
  while ok do
    local err
    ok, err = s:dohandshake()
    if ok or not blocked(err) then return ok, err end
    ok, why = wait(s, err, false)
  end
  return nil, why
end

local function receive (s, pattern, idle)  -- keeps what came so far
  local got = ""
  while true do
    local r, err, partial = s:receive(pattern, got)
    if r or not blocked(err) then return r, err end
    got = partial
    local ready, why = wait(s, err, idle and got == "" and err == "wantread")
    if not ready then return nil, why end
  end
end

local function send (s, data)  -- goes on after what went
  local i = 1
  while true do
    local last, err, sent = s:send(data, i)
    if last or not blocked(err) then return last, err end
    i = sent + 1
    local ready, why = wait(s, err, false)
    if not ready then return nil, why end
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
      if handshake(s) then
        local answered = false  -- (the first line is awaited, not idle)
        while true do  -- a line in, the line in capitals out, until EOF
          local line = receive(s, "*l", answered)
          if not line or not send(s, line:upper() .. "\n") then break end
          answered = true
        end
      end
      s:close()
    end)
  end,
}
