#!/usr/bin/env lua5.4
-- examples/http.lua [PORT [HOST]]: a preforking HTTP server, on
-- 127.0.0.1:8080 by default (an IPv6 HOST goes without brackets). Each
-- worker answers every request with an HTML page that lists the
-- request's headers, the worker's PID and the time. Workers run worker:serve: many connections each, one coroutine
-- per connection, HTTP/1.1 persistent connections (pipelining-safe),
-- HTTP/1.0 keep-alive on request, "Connection: close" honoured. A
-- malformed request gets 400 and the connection closes. Each request
-- counts (worker:count) toward max_requests; a worker that hangs for 10 s
-- is replaced; HUP starts new workers, USR2 upgrades to the code on disk.
-- Try: curl -i http://127.0.0.1:8080/   or   wrk http://127.0.0.1:8080/

local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. here
               .. "examples/?.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local prefork = require "prefork"

local read_request = require "http_request"


local function escape (s)
  return (s:gsub("[<>&\"]", {["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;",
                             ['"'] = "&quot;"}))
end


-- the answer; unless the connection is kept, it closes with it (the last
-- bytes leave with the FIN)
local function respond (conn, status, body, keep)
  local answer = ("HTTP/1.1 %s\r\nContent-Type: text/html; charset=utf-8\r\n"
                  .. "Content-Length: %d\r\nConnection: %s\r\n\r\n%s"):format(
                 status, #body, keep and "keep-alive" or "close", body)
  if keep then return conn:write(answer) end
  return conn:close(answer)
end


-- does the client want the connection kept after this request?
local function keepalive (req)
  local c = (req.headers["connection"] or ""):lower()
  if req.version == "1.0" then return c:find("keep%-alive") ~= nil end
  return not c:find("close")
end


local function page (req)
  local rows = {}
  for _, name in ipairs(req.names) do
    rows[#rows + 1] = ("<tr><td>%s</td><td>%s</td></tr>"):format(
      escape(name), escape(req.headers[name:lower()]))
  end
  return "<html><head><title>lua-prefork Pre-Forking Server Example</title>"
    .. "</head><body><table border=1>" .. table.concat(rows)
    .. ("<tr><td>PID</td><td>%d</td></tr>"):format(prefork.getpid())
    .. ("<tr><td>time</td><td>%s</td></tr>"):format(
         os.date("!%a %b %d %H:%M:%S %Y GMT"))
    .. "</table></body></html>\n"
end


local worker  -- this process's, once it is one

-- one connection, in its own coroutine: requests until one of the two
-- sides wants to close, or the worker stops (its last answer says that
-- the connection closes: a graceful stop, reload or upgrade loses no
-- request of a keep-alive client)
local function serve (conn)
  local first = true
  conn:settimeout(10)  -- an idle or slow client does not stay forever
  while true do
    local req, err = read_request(conn)
    if not req then
      if err ~= "closed" and err ~= "timeout" and err ~= "stopping" then
        respond(conn, "400 Bad Request", "<html>" .. escape(err) .. "</html>\n")
      end
      return
    end
    local length = tonumber(req.headers["content-length"] or 0)
    if req.headers["transfer-encoding"] or not length or length < 0
       or length > 1048576 or length ~= math.floor(length) then
      respond(conn, "400 Bad Request", "<html>unsupported body</html>\n")
      return
    end
    if length > 0 and not conn:read(length) then return end  -- read, not used
    if not first then worker:count() end  -- (the connection counted one)
    first = false
    local keep = keepalive(req) and not worker:stopping()
    if not respond(conn, "200 OK", page(req), keep) or not keep then return end
  end
end


local generation = 0

prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or prefork.ncpu(),
  -- a worker without a heartbeat for 10 s is replaced (a handler that
  -- hangs), and so is one after about 10 000 requests (a slow leak)
  timeout = 10,
  max_requests = 10000, max_requests_jitter = 1000,
  -- each HUP starts new workers (this is where a new config would load)
  update = function ()
    generation = generation + 1
    return {generation = generation}
  end,
  listen = (arg[2] or "127.0.0.1"):gsub("^(.*:.*)$", "[%1]") .. ":" .. (arg[1] or 8080),
  title = "http.lua",
  on_start = function (master)
    print("HTTP server on http://" .. master:addresses()[1] .. "/ (master "
          .. prefork.getpid() .. ")")
    io.stdout:flush()
  end,
  accept = os.getenv("ACCEPT"),  -- "shared" (default) or "master"
  fork = function (w)
    worker = w
    worker:serve(serve)
  end,
}
