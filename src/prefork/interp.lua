--- prefork.interp: the script side of prefork-interp (chiark-utils), for
-- Lua. A script pays its start-up cost once; each invocation is then
-- served by a fork of the initialised script with the caller's stdin,
-- stdout, stderr, arguments, environment and exit status.
--
--   #!/usr/bin/prefork-interp -U,lua5.4     (or #!/usr/bin/env lua-prefork)
--   local interp = require "prefork.interp"
--   ... expensive initialisation ...
--   interp.initialisation_complete{max_servers = 4}
--   ... per-invocation code: arg, os.getenv, io.* are the caller's ...
--
-- The server, its calls and the executors are C (src/interp*.c, the wire
-- in src/wire.c), on the module's libev loop.

local core = require "prefork.core"

local interp = {}

-- made first, finalized last: ends an executor without freeing the heap
-- it shares with the server (see "A quick end" in src/interp_exec.c)
local sentinel = core.interp_sentinel()
interp._sentinel = sentinel
-- the data the initialisation is about to make, in one heap: the server
-- puts it in huge pages, which makes the forks of spares cheaper
core.interp_oneheap()

local also = {}  -- prefork_autoreload_also_check paths


--- Also check these paths for a newer mtime than the server's start: a
-- newer one makes the server quit before accepting, so that the next call
-- starts a fresh one. A missing path is not an error.
function interp.autoreload_also_check (...)
  for i = 1, select("#", ...) do
    local p = select(i, ...)
    if type(p) ~= "string" then
      error(("bad argument #%d to 'autoreload_also_check' (string expected, got %s)")
            :format(i, type(p)), 2)
    end
    also[#also + 1] = p
  end
end


local stdlibs = {_G = true, package = true, coroutine = true, table = true,
  io = true, os = true, string = true, math = true, utf8 = true, debug = true}


--- The files of the modules in package.loaded (found as require would).
local function modulefiles (out)
  local names = {}
  for name in pairs(package.loaded) do
    if type(name) == "string" and not stdlibs[name] then
      names[#names + 1] = name
    end
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local p = package.searchpath(name, package.path)
           or package.searchpath(name, package.cpath)
           or package.searchpath(name:match("^[^.]+"), package.cpath)
    if p then out[#out + 1] = p end
  end
end


local checks = {
  max_servers = function (v) return math.type(v) == "integer", "an integer" end,
  idle_timeout = function (v) return type(v) == "number", "a number" end,
  autoreload_inc = function (v) return type(v) == "boolean", "a boolean" end,
  autoreload_extra = function (v)
    if type(v) ~= "table" then return false, "a list of paths" end
    for _, p in ipairs(v) do
      if type(p) ~= "string" then return false, "a list of paths" end
    end
    return true
  end,
  max_errors = function (v) return math.type(v) == "integer", "an integer" end,
  log_facility = function (v) return type(v) == "string", "a string" end,
  keep_fds = function (v)
    if type(v) ~= "table" then return false, "a list of fds" end
    for _, fd in ipairs(v) do
      if math.type(fd) ~= "integer" or fd < 3 then return false, "a list of fds >= 3" end
    end
    return true
  end,
}


local function checkopts (opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error("bad argument #1 to 'initialisation_complete' (table expected, got "
          .. type(opts) .. ")", 3)
  end
  for k, v in pairs(opts) do
    local check = checks[k]
    if not check then
      error(("bad argument #1 to 'initialisation_complete' (unknown option '%s')")
            :format(tostring(k)), 3)
    end
    local ok, what = check(v)
    if not ok then
      error(("bad argument #1 to 'initialisation_complete' (option '%s' must be %s, got %s)")
            :format(k, what, type(v) == "string" and ("%q"):format(v) or tostring(v)), 3)
    end
  end
  return opts
end


--- arg for one call from the request's argv: INTERP [flags...] SCRIPT ARGS.
-- The script is the first entry after INTERP equal to the script path the
-- server started with (arg[0] then); without one, the second entry (the
-- layout Debian's wrapper sends). What precedes it goes to arg[-n..-1].
local function makearg (argv, script)
  local k
  for i = 2, #argv do
    if argv[i] == script then k = i break end
  end
  k = k or math.min(2, #argv)
  local a = {}
  for i = 1, #argv do a[i - k] = argv[i] end
  return a
end
interp._makearg = makearg


--- Turn this script into a prefork-interp server. Returns once per call,
-- each time in a new process (the executor), with arg, the environment
-- and fds 0/1/2 the caller's. Without PREFORK_INTERP in the environment
-- (run directly): nothing happens, it returns at once.
function interp.initialisation_complete (opts)
  opts = checkopts(opts)
  local script = rawget(_G, "arg") and arg[0]
  local env = os.getenv("PREFORK_INTERP")
  if env == nil then return end
  local files = {}
  if script then files[#files + 1] = script end
  if opts.autoreload_inc ~= false then modulefiles(files) end
  for _, p in ipairs(opts.autoreload_extra or {}) do files[#files + 1] = p end
  for _, p in ipairs(also) do files[#files + 1] = p end
  local keep = {}
  for i, fd in ipairs(opts.keep_fds or {}) do keep[i] = fd end
  -- os.exit keeps a closing exit's code for the executor's quick end;
  -- wrapped here, once, not in each executor (whose every write to a
  -- table of the server's is a page copied)
  local exit = os.exit
  os.exit = function (code, close)
    if close then core.interp_setexit(code) end
    return exit(code, close)
  end
  local argv = core.interp_serve(env, {
    files = files,
    keep = keep,
    max_servers = opts.max_servers,
    idle_timeout = opts.idle_timeout,
    max_errors = opts.max_errors,
    log_facility = opts.log_facility,
    ident = "prefork-interp " .. (script or "?"),
    servertitle = (script or "lua") .. " [server]",
    sparetitle = (script or "lua") .. " [spare]",
    makertitle = (script or "lua") .. " [spare maker]",
  })
  -- only an executor gets here
  _G.arg = makearg(argv, script)
end


return interp
