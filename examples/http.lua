#!/usr/bin/env lua5.4
-- examples/http.lua [PORT]: the preforking HTTP server of the POE example
-- (seed 002), port 8080 by default. Each worker answers every request
-- with an HTML page that lists the request's headers, the worker's PID and
-- the time, then closes the connection (HTTP/1.1, "Connection: close").
-- A malformed request gets 400. Try: curl -i http://127.0.0.1:8080/

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


local function respond (conn, status, body)
  conn:write(("HTTP/1.1 %s\r\nContent-Type: text/html; charset=utf-8\r\n"
              .. "Content-Length: %d\r\nConnection: close\r\n\r\n%s"):format(
             status, #body, body))
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


local function serve (conn)
  conn:settimeout(10)
  local req, err = read_request(conn)
  if req then
    local length = tonumber(req.headers["content-length"] or 0)
    if length and length >= 0 and length <= 1048576 then
      if length > 0 then conn:read(length) end  -- a body: read, not used
      respond(conn, "200 OK", page(req))
    else
      respond(conn, "400 Bad Request", "<html>bad Content-Length</html>\n")
    end
  elseif err ~= "closed" and err ~= "timeout" then
    respond(conn, "400 Bad Request", "<html>" .. escape(err) .. "</html>\n")
  end
  conn:close()
end


prefork.start{
  workers = tonumber(os.getenv("WORKERS")) or prefork.ncpu(),
  listen = "127.0.0.1:" .. (arg[1] or 8080),
  title = "http.lua",
  on_start = function (master)
    print("HTTP server on http://" .. master:addresses()[1] .. "/ (master "
          .. prefork.getpid() .. ")")
    io.stdout:flush()
  end,
  fork = function (worker)
    for conn in worker:connections() do serve(conn) end
  end,
}
