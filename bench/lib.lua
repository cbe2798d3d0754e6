-- bench/lib.lua: what bench.lua and chaos.lua share.

local prefork = require "prefork"

local lib = {}

lib.GET = "GET / HTTP/1.0\r\nHost: x\r\n\r\n"

--- A port free on 127.0.0.1 right now.
function lib.freeport ()
  local l = assert(prefork.listen("127.0.0.1:0"))
  local port = tonumber(l:address():match(":(%d+)$"))
  l:close()
  return port
end

--- wrk's output: requests, req/s, and failed requests (socket errors and
-- answers that are not 2xx or 3xx).
function lib.wrkstats (out)
  local errs = 0
  for n in (out:match("Socket errors:([^\n]*)") or ""):gmatch("%d+") do
    errs = errs + tonumber(n)
  end
  errs = errs + tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)") or 0)
  return tonumber(out:match("(%d+) requests in")) or 0,
         tonumber(out:match("Requests/sec:%s*([%d.]+)")) or 0, errs
end

return lib
