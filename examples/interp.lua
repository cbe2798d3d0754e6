#!/usr/bin/env lua-prefork
-- or: #!/usr/bin/prefork-interp -U,lua5.4   (Debian's wrapper works too)
--
-- A script with an expensive initialisation (~200 ms: a large table and
-- a pause standing for loading data), paid once: every later call is a
-- fork of the initialised server. From a checkout, try it twice:
--   time build/lua-prefork examples/interp.lua a b
--   time build/lua-prefork examples/interp.lua c d
-- Standalone (no wrapper) it runs straight through, initialisation
-- included: lua5.4 examples/interp.lua a b
local here = arg[0]:match("^(.-)[^/]*$") .. "../"  -- run from a checkout
package.path = here .. "src/?.lua;" .. here .. "src/?/init.lua;" .. package.path
package.cpath = here .. "build/?.so;" .. package.cpath

local interp = require "prefork.interp"
local prefork = require "prefork"

local words = {}
for i = 1, 200000 do words[i] = ("w%06d"):format(i) end  -- the "data"
prefork.sleep(0.15)  -- and whatever else makes start-up slow

interp.initialisation_complete{max_servers = 4, idle_timeout = 600}

-- per call: arg, os.getenv and io.* are the caller's
local function parent (pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  local s = f and f:read("a") or ""
  if f then f:close() end
  return tonumber(s:match("%) %a (%d+)"))
end
local me = prefork.getpid()
io.stdout:write(("hello from pid %d (server %d), %d words ready; args: %s\n")
  :format(me, parent(me), #words, table.concat(arg, " ")))
