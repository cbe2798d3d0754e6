--- prefork: preforking servers for Lua 5.4, on libev.
-- The C core (prefork.core) forks, reaps, times and signals; this front
-- holds the public surface: options and their checking, defaults, the
-- worker set as contexts, and the objects handed to user code.

-- (The check comes first, so this file must parse in Lua 5.1 too: no goto,
-- //, bitwise operators, <close> or <const> anywhere in it.)
if _VERSION ~= "Lua 5.4" then
  error(("lua-prefork needs Lua 5.4 (this is %s)"):format(_VERSION), 2)
end

local core = require "prefork.core"
local listeners = require "prefork.listeners"
local deploy = require "prefork.deploy"

local prefork = {
  _VERSION = core._VERSION,
  fork = core.fork,
  wait = core.wait,
  kill = core.kill,
  signame = core.signame,
  getpid = core.getpid,
  subreaper = core.subreaper,
  settitle = core.settitle,
  ncpu = core.ncpu,
  listen = core.listen,
  connect = core.connect,
  socketpair = core.socketpair,
  conn = core.conn,
  sleep = core.sleep,
  encode = core.encode,
  decode = core.decode,
  wait_fd = core.wait_fd,
  close = core.close,
  sendfds = core.sendfds,
  recvfds = core.recvfds,
  peercred = core.peercred,
  pool = require "prefork.pool",
}

-- prefork.socket (LuaSocket's surface, socket.lua) loads when first used
setmetatable(prefork, {__index = function (t, k)
  if k == "socket" then
    local m = require "prefork.socket"
    rawset(t, k, m)
    return m
  end
end})


-- {======================================================
-- Helpers
-- =======================================================

--- Structural equality: tables compared deeply (cycles allowed),
-- everything else (functions too) by identity.
local function deepeq (a, b, seen)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  seen = seen or {}
  if seen[a] == b then return true end
  seen[a] = b
  for k, v in pairs(a) do
    if not deepeq(v, b[k], seen) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
prefork.deepeq = deepeq


local function idorder (a, b)
  local ta, tb = type(a.id), type(b.id)
  if ta ~= tb then return ta < tb end
  return a.id < b.id
end

-- }======================================================


-- {======================================================
-- Options
-- =======================================================

local checks = {}  -- option name -> function(value) raising on a bad one

local function isfunction (v) return type(v) == "function" end

local function opt_number (min)
  return function (v)
    return math.type(v) ~= nil and v >= min, "a number >= " .. min
  end
end

local function opt_integer (min)
  return function (v)
    return math.type(v) == "integer" and v >= min,
           min == 1 and "a positive integer" or "an integer >= " .. min
  end
end

for _, name in ipairs{"update", "fork", "on_start", "before_fork",
                      "after_fork", "on_worker_exit", "on_reload",
                      "on_tick"} do
  checks[name] = function (v) return isfunction(v), "a function" end
end

-- a number of seconds > 0, or false (off)
local function opt_seconds (v)
  return v == false or (math.type(v) ~= nil and v > 0),
         "a number of seconds > 0, or false"
end

checks.workers = opt_integer(1)
checks.backlog = opt_integer(1)
checks.graceful_timeout = opt_number(0)
checks.timeout = opt_seconds
checks.boot_timeout = opt_seconds
checks.max_requests = opt_integer(0)
checks.max_requests_jitter = opt_integer(0)
checks.max_memory = opt_integer(0)
checks.max_boot_failures = opt_integer(0)
checks.standby = function (v)
  return type(v) == "boolean" or (math.type(v) == "integer" and v >= 0
                                  and v <= 16),
         "a boolean or an integer from 0 to 16"
end
checks.tick = function (v)
  return math.type(v) ~= nil and v > 0, "a number of seconds > 0"
end
checks.status = function (v) return type(v) == "string", "an address" end
checks.upgrade_timeout = opt_number(0)
checks.pid_file = function (v) return type(v) == "string", "a path" end
checks.user = function (v) return type(v) == "string", "a user name" end
checks.group = function (v) return type(v) == "string", "a group name" end
checks.reload = function (v)
  return v == "update" or v == "exec", '"update" or "exec"'
end
checks.defer_accept = opt_integer(0)
checks.title = function (v) return type(v) == "string", "a string" end
checks.log = function (v)
  return type(v) == "function" or type(v) == "string", "a function or a path"
end
local strategies = {shared = true, master = true, reuseport = true, mutex = true}
checks.accept = function (v)
  return strategies[v] ~= nil, '"shared", "reuseport", "mutex" or "master"'
end
checks.listen = function (v)
  local t = type(v)
  if t == "string" or t == "number" then return true end
  if t ~= "table" then return false, "an address or a list of addresses" end
  for i, a in ipairs(v) do
    local ta = type(a)
    if ta ~= "string" and ta ~= "number" then
      return false, "a list of addresses (item " .. i .. " is a " .. ta .. ")"
    end
  end
  return true
end


-- a value as an error message shows it: 2.5, "text", a table
local function shown (v)
  local t = type(v)
  if t == "string" then return ("%q"):format(v) end
  if t == "number" or t == "boolean" or t == "nil" then return tostring(v) end
  return "a " .. t
end


local function checkopts (opts)
  if type(opts) ~= "table" then
    error("prefork.start: options must be a table (got " .. shown(opts) .. ")", 3)
  end
  for k, v in pairs(opts) do
    local check = checks[k]
    if not check then
      error(("prefork.start: unknown option '%s'"):format(tostring(k)), 3)
    end
    local ok, want = check(v)
    if not ok then
      error(("prefork.start: %s must be %s (got %s)"):format(
            k, want, shown(v)), 3)
    end
  end
  if not opts.fork then
    error("prefork.start: option 'fork' (the worker's body) is required", 3)
  end
end


-- }======================================================


-- {======================================================
-- The worker object (in the child)
-- =======================================================

local Worker = {
  accept = core.accept,  -- these ignore their self
  stopping = core.stopping,
  serve = core.serve,
  ready = core.ready,
  beat = core.beat,
  count = core.count,
}
Worker.__index = Worker

--- Iterate over accepted connections until a graceful stop begins.
-- An accept failure other than the stop raises (the worker is respawned).
function Worker:connections ()
  return function ()
    local c, err = core.accept()
    if c then return c end
    if err == "stopping" then return nil end
    error(err, 2)
  end
end

-- }======================================================


-- {======================================================
-- The master object and its policy
-- =======================================================

local Master = {}
Master.__index = Master

--- The workers: {id, pid, state, started, exits, accepted, inflight},
-- sorted by id.
function Master:workers ()
  local list = self.core:workers()
  for _, w in ipairs(list) do w.context = nil end
  table.sort(list, idorder)
  return list
end

function Master:addresses ()
  return table.move(self.addrs, 1, #self.addrs, 1, {})
end

--- {pid, started, uptime, workers = master:workers(), respawns, reloads,
-- upgrades, timeouts, recycled, requests}
function Master:stats ()
  local st = self.core:stats()
  for _, w in ipairs(st.workers) do w.context = nil end
  table.sort(st.workers, idorder)
  st.reloads, st.upgrades = self.reloads, self.upgrades
  return st
end

function Master:stop (graceful)
  self.core:stop(graceful == nil or graceful)
end


-- make the running set this one: start what is new or changed, drop what
-- went; unchanged workers are left alone
function Master:apply (config, contexts)
  local changed = not deepeq(config, self.config)
  local seen = {}
  for _, ctx in ipairs(contexts) do
    local old = self.running[ctx.id]
    if changed or not old or not deepeq(ctx, old) then
      self.core:want(ctx)
    end
    seen[ctx.id] = true
  end
  for id in pairs(self.running) do
    if not seen[id] then self.core:drop(id) end
  end
  self.config = config
  self.running = {}
  for _, ctx in ipairs(contexts) do self.running[ctx.id] = ctx end
  self.contexts = contexts
end


local function countset (n)
  local set = {}
  for i = 1, n do set[i] = {id = i} end
  return set
end


local function checkset (contexts)
  if type(contexts) ~= "table" then
    return nil, "contexts must be a list of tables, got " .. type(contexts)
  end
  local ids = {}
  for i, ctx in ipairs(contexts) do
    if type(ctx) ~= "table" then
      return nil, ("context %d is a %s, not a table"):format(i, type(ctx))
    end
    local id, t = ctx.id, type(ctx.id)
    if (t ~= "number" and t ~= "string") or id ~= id then
      return nil, ("context %d has no id (a number or a string)"):format(i)
    end
    if ids[id] then
      return nil, ("context %d repeats the id %s"):format(i, tostring(id))
    end
    ids[id] = true
  end
  return contexts
end


-- run update: config, contexts | nil, err
function Master:update ()
  local update = self.opts.update
  if not update then return true, countset(self.count) end
  local ok, config, contexts = xpcall(update, debug.traceback, self)
  if not ok then return nil, config end
  if config == nil then
    return nil, contexts ~= nil and tostring(contexts) or "update returned nil"
  end
  if contexts == nil then
    self.fromupdate = false
    return config, countset(self.count)
  end
  local set, err = checkset(contexts)
  if not set then return nil, err end
  self.fromupdate = true
  self.count = #set
  return config, set
end


--- Run update again (as SIGHUP does); a failure keeps the running set.
function Master:reload ()
  self.reloads = self.reloads + 1
  local config, contexts = self:update()
  local ok, err = config ~= nil, contexts
  if ok then
    self.core:renew()  -- standbys are copies of the master before update
    self:apply(config, contexts)
    core.log("info", "reloaded: " .. #contexts .. " workers")
    self.core:waitready()
  else
    core.log("error", "reload failed, the running set stays: " .. tostring(err))
  end
  if self.opts.on_reload then
    local hok, herr = xpcall(self.opts.on_reload, debug.traceback, self, ok,
                             not ok and err or nil)
    if not hok then core.log("error", "on_reload failed: " .. herr) end
  end
  return ok, not ok and err or nil
end


--- Change the number of workers (as TTIN and TTOU do). With contexts from
-- update, a new one copies the highest and takes id = max + 1; the
-- highest ids go first.
function Master:set_workers (n)
  if math.type(n) ~= "integer" or n < 0 then
    error("master:set_workers: n must be an integer >= 0 (got " .. tostring(n) .. ")", 2)
  end
  local set = {}
  for i, ctx in ipairs(self.contexts) do set[i] = ctx end
  table.sort(set, idorder)
  if not self.fromupdate then
    set = countset(n)
  elseif n > #set then
    local last = set[#set] or {id = 0}
    if math.type(last.id) ~= "integer" then
      error("set_workers: needs integer worker ids to add one", 2)
    end
    while #set < n do
      local ctx = {}
      for k, v in pairs(last) do ctx[k] = v end
      ctx.id = last.id + 1
      set[#set + 1], last = ctx, ctx
    end
  else
    while #set > n do set[#set] = nil end
  end
  self.count = n
  self:apply(self.config, set)
end


-- in the new worker: after_fork(worker), then fork(worker)
local function childmain (self, ctx)
  local w = setmetatable({
    id = ctx.id, context = ctx, config = self.config,
    listeners = self.listeners,
  }, Worker)
  if self.opts.after_fork then self.opts.after_fork(w) end
  self.opts.fork(w)
end


-- TTIN: one worker more; TTOU: one less, but the last stays (from Lua,
-- master:set_workers(0) can still empty the set)
local function scale (self, name)
  local n = self.count + (name == "TTIN" and 1 or -1)
  if n < 1 then
    core.log("warn", "TTOU: refused, the last worker stays (" .. self.count
             .. " running)")
    return
  end
  self:set_workers(n)
  core.log("info", ("%s: %d worker%s"):format(name, n, n == 1 and "" or "s"))
end


local function onsignal (self, name)
  if name == "HUP" and self.opts.reload == "exec" then
    deploy.upgrade(self, "HUP")
  elseif name == "HUP" then
    core.log("info", "HUP: reloading")
    deploy.reloading()
    self:reload()
  elseif name == "TTIN" or name == "TTOU" then
    scale(self, name)
  elseif name == "USR1" then
    deploy.reopenlog(self)
  elseif name == "USR2" then
    deploy.upgrade(self, "USR2")
  end
end

-- }======================================================


-- every listener of opts (listeners.lua), with defer_accept; raises,
-- having closed what it opened
local function openall (opts)
  local ls = listeners.open(opts, function (msg) core.log("info", msg) end)
  for i, l in ipairs(ls) do
    local ok, err = true, nil
    if opts.defer_accept and opts.defer_accept > 0 and not l:address():match("^unix:") then
      ok, err = l:setdefer(opts.defer_accept)
    end
    if not ok then
      listeners.close(ls)
      error(("prefork.start: defer_accept on listen[%d]: %s"):format(i, err), 0)
    end
  end
  return ls
end


-- the C master of self, with the options and hooks it runs
local function coremaster (self, opts, listeners)
  local status = require "prefork.status"
  return core.master{
    listeners = listeners, status_listener = listeners.status,
    status_page = function (method, path)
      return status.page(self, method, path)
    end,
    graceful_timeout = opts.graceful_timeout,
    timeout = opts.timeout, boot_timeout = opts.boot_timeout,
    max_requests = opts.max_requests,
    max_requests_jitter = opts.max_requests_jitter,
    max_memory = opts.max_memory, max_boot_failures = opts.max_boot_failures,
    tick = opts.tick,
    standby = opts.standby == true and 1 or opts.standby or 0,
    on_tick = opts.on_tick and function () opts.on_tick(self) end,
    accept = opts.accept,
    title = opts.title,
    child = function (ctx) childmain(self, ctx) end,
    before_fork = opts.before_fork
                  and function (ctx) opts.before_fork(self, ctx) end,
    on_exit = opts.on_worker_exit
              and function (info) opts.on_worker_exit(self, info) end,
    on_signal = function (name) onsignal(self, name) end,
    on_start = function ()
      core.watchdog(true)
      if opts.on_start then opts.on_start(self) end
    end,
    on_ready = function () deploy.ready(self) end,
    on_stopping = function () deploy.stopping(self) end,
    on_upgrade = function (ok, why) deploy.upgraded(self, ok, why) end,
    user = self.ids and self.ids.name, uid = self.ids and self.ids.uid,
    gid = self.ids and self.ids.gid,
  }
end


-- the master object for opts and its listeners (ls)
local function newmaster (opts, ls)
  local self = setmetatable({
    opts = opts, listeners = ls, running = {}, contexts = {},
    count = opts.workers or core.ncpu(), addrs = {}, reloads = 0, upgrades = 0,
  }, Master)
  for i, l in ipairs(ls) do self.addrs[i] = l:address() end
  local ok, ids = pcall(deploy.ids, opts, ls)
  if not ok then
    listeners.close(ls)
    error(ids, 0)
  end
  self.ids = ids
  return self
end


-- the first update, the log, the pid file: what comes before the run;
-- raises, having closed the listeners
local function prepare (self, opts)
  local err
  self.core, err = coremaster(self, opts, self.listeners)
  if not self.core then error("prefork.start: " .. err, 0) end
  local config, contexts = self:update()  -- the master object works in it
  if config == nil then
    error("prefork.start: update failed: " .. tostring(contexts), 0)
  end
  deploy.openlog(self)
  if type(opts.log) == "function" then core.setlog(opts.log) end
  deploy.writepid(self)
  self:apply(config, contexts)
  if opts.title then core.settitle(opts.title .. " master") end
end


--- Run a preforking server. Returns true after a stop; raises on every
-- setup failure, having closed what it opened.
function prefork.start (opts)
  checkopts(opts)
  local self = newmaster(opts, openall(opts))
  local ok, err, why = pcall(prepare, self, opts)
  if ok then ok, err, why = pcall(self.core.run, self.core) end
  listeners.close(self.listeners)
  core.watchdog(false)
  if type(opts.log) == "function" then core.setlog(nil) end
  deploy.removepid(self)
  if not ok then error(err, 0) end
  if not err then error("prefork.start: giving up: " .. why, 2) end
  return true
end


return prefork
