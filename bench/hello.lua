#!/usr/bin/env lua5.4
-- bench/hello.lua PORT [WORKERS [DELAY]]: the fixed hello handler of the
-- benchmarks and chaos runs, on worker:serve (a coroutine per
-- connection). Answers every request with the 13-byte body "Hello,
-- World!" (nginx's `return 200 "Hello, World!"`), keeping the connection
-- unless the client says "Connection: close" or speaks HTTP/1.0.
-- DELAY (seconds) is slept (prefork.sleep: the worker goes on serving)
-- after the first byte of the answer, to give chaos runs work in flight.
-- The update hook hands out a new config on each SIGHUP, so every reload
-- replaces every worker. ACCEPT=reuseport|mutex|master picks a strategy;
-- QUIET=1 silences the log; TIMEOUT=S sets timeout, and GET /hang then
-- loops for ever (the hang case); MAX_REQUESTS=N recycles the workers (a
-- stopping worker's last answer closes its connection); PRELOAD_MB=N makes an
-- N MB Lua heap in the master before the fork; FULLGC=1 runs a full
-- collection in each worker first (the worst case for copy-on-write);
-- STANDBY=N keeps N standbys (titled "hello standby", the workers "hello
-- worker ID").

local here = arg[0]:match("^(.-)[^/]*$") .. "../"
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

local port = arg[1] or "8080"
local delay = tonumber(arg[3] or 0)
local hangs = os.getenv("TIMEOUT") ~= nil  -- GET /hang loops (the hang case)

local HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
local KEEP = HEAD .. "\r\nHello, World!"
local CLOSE = HEAD .. "Connection: close\r\n\r\nHello, World!"

local C, c, CR = ("C"):byte(), ("c"):byte(), ("\r"):byte()

local worker  -- this process's, once it is one

local function hello (conn)
  local read, write = conn.read, conn.write
  local first = true
  conn:settimeout(10)
  while true do
    local line = read(conn, "l")
    if not line then return end
    if hangs and line:find("^GET /hang ") then while true do end end
    local close = line:find("HTTP/1.0", 1, true) ~= nil
    while true do  -- the headers, up to the empty line
      line = read(conn, "l")
      if not line then return end
      local b = line:byte(1)
      if b == CR or b == nil then break end
      if (b == C or b == c) and line:find("^[Cc]onnection:%s*[Cc]lose") then
        close = true
      end
    end
    close = close or worker:stopping()  -- a graceful stop: the last one
    if not first then worker:count() end  -- a request more (max_requests)
    first = false
    local answer = close and CLOSE or KEEP
    if delay > 0 then
      write(conn, "H")
      prefork.sleep(delay)
      answer = answer:sub(2)
    end
    if close then return conn:close(answer) end  -- the answer leaves with the FIN
    if not write(conn, answer) then return end
  end
end

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
  accept = os.getenv("ACCEPT"),  -- the strategy; "shared" by default
  defer_accept = 1,  -- HTTP: the client speaks first (nginx: listen deferred)
  log = os.getenv("QUIET") and function () end or nil,
  update = function ()
    generation = generation + 1
    return {generation = generation}
  end,
  on_start = function (m)
    print("listening " .. m:addresses()[1])
    io.stdout:flush()
  end,
  max_requests = tonumber(os.getenv("MAX_REQUESTS")),
  standby = tonumber(os.getenv("STANDBY")),
  title = os.getenv("STANDBY") and "hello" or nil,
  timeout = os.getenv("TIMEOUT_OFF") and false or tonumber(os.getenv("TIMEOUT")),
  fork = function (w)
    if os.getenv("FULLGC") == "1" then collectgarbage() end  -- worst case
    worker = w
    worker:serve(hello)
  end,
}
