--- prefork.deploy: what a master does for the system that runs it: the
-- pid file, systemd's notifications, the log file and its reopening,
-- the workers' user, and the zero-downtime upgrade (USR2, or HUP with
-- reload = "exec"). Each function takes the master object (init.lua's).

local core = require "prefork.core"
local listeners = require "prefork.listeners"

local D = {}


-- {======================================================
-- The pid file
-- =======================================================

--- Write the master's pid to the pid file, atomically (a whole file or
-- none: written aside, then renamed over). Raises when it cannot.
function D.writepid (self)
  local path = self.opts.pid_file
  if not path then return end
  local tmp = ("%s.%d.tmp"):format(path, core.getpid())
  local f, err = io.open(tmp, "w")
  if f then f:write(core.getpid(), "\n") f:close() end
  local ok, rerr = f and os.rename(tmp, path)
  if not ok then
    os.remove(tmp)
    error(("prefork.start: pid_file %s: %s"):format(path, err or rerr), 0)
  end
end


-- the pid in file path, or nil
local function pidin (path)
  local f = io.open(path)
  local pid = f and tonumber(f:read("l"))
  if f then f:close() end
  return pid
end


--- At a clean stop: the pid file goes (if it still names this master),
-- and the .oldbin one of an upgrade that succeeded.
function D.removepid (self)
  local path = self.opts.pid_file
  if not path then return end
  if pidin(path) == core.getpid() then os.remove(path) end
  if pidin(path .. ".oldbin") == core.getpid() then os.remove(path .. ".oldbin") end
end

-- }======================================================


-- {======================================================
-- systemd
-- =======================================================

local function status (self)
  local ready = 0
  for _, w in ipairs(self.core:workers()) do
    if w.state == "running" then ready = ready + 1 end
  end
  return ("STATUS=%d worker%s ready"):format(ready, ready == 1 and "" or "s")
end


--- Every worker of the set is ready (after the start, a reload, or as
-- the new master of an upgrade): READY=1 and its status; the first
-- time also MAINPID (NotifyAccess=all lets the new master of an upgrade
-- say it), and the old master of an upgrade hears that it can go.
function D.ready (self)
  local msg = "READY=1\n" .. status(self)
  if not self.announced then
    self.announced = true
    msg = ("READY=1\nMAINPID=%d\n%s"):format(core.getpid(), status(self))
  end
  core.notify(msg)
  local fd = self.listeners.upgradefd
  if fd then
    self.listeners.upgradefd = nil
    local c = core.conn(fd)
    if c then c:write("r") c:close() end
  end
end


function D.reloading ()
  core.notify(("RELOADING=1\nMONOTONIC_USEC=%d"):format(
              math.floor(core.now() * 1e6)))
end


function D.stopping ()
  core.notify("STOPPING=1")
end

-- }======================================================


-- {======================================================
-- The log file, the workers' user
-- =======================================================

--- The log option as a path: stderr (ours and the workers') goes there.
function D.openlog (self)
  local log = self.opts.log
  if type(log) ~= "string" then return end
  local ok, err = core.logfile(log)
  if not ok then error(("prefork.start: log %q: %s"):format(log, err), 0) end
  if self.ids then core.chown(log, self.ids.uid, self.ids.gid) end
end


--- USR1: the log file again, in the master and the workers (logrotate
-- moved it; the workers' user gets it, as unicorn does).
function D.reopenlog (self)
  if type(self.opts.log) ~= "string" then
    core.log("info", "USR1: no log file to reopen (the log goes to "
             .. (self.opts.log and "a function" or "stderr") .. ")")
    return
  end
  local ok, err = core.reopenlog()
  if ok and self.ids then core.chown(self.opts.log, self.ids.uid, self.ids.gid) end
  for _, w in ipairs(self.core:workers()) do
    if w.pid then core.kill(w.pid, "USR1") end
  end
  self.core:renew()  -- standbys: forked again, onto the new log
  core.log(ok and "info" or "error", "USR1: " .. (ok and "reopened " .. self.opts.log
           or "cannot reopen the log: " .. tostring(err)))
end


--- user, group: the workers' ids (checked: only root may switch), and
-- the Unix socket files handed to them.
function D.ids (opts, ls)
  if not opts.user and not opts.group then return nil end
  if core.getuid() ~= 0 then
    error(("prefork.start: user and group need the master to run as root "
           .. "(it runs as uid %d)"):format(core.getuid()), 0)
  end
  local uid, gid, name = core.ids(opts.user or "root", opts.group)
  if not uid then error("prefork.start: " .. gid, 0) end
  for _, l in ipairs(ls) do
    local path = l:address():match("^unix:(.+)$")
    if path then core.chown(path, uid, gid) end
  end
  return {uid = uid, gid = gid, name = name}
end

-- }======================================================


-- {======================================================
-- The upgrade: the old master's side
-- =======================================================

local function environment (fds, upfd)
  local env = {}
  for _, kv in ipairs(core.environ()) do
    if not kv:match("^PREFORK_FDS=") and not kv:match("^PREFORK_UPGRADE_FD=") then
      env[#env + 1] = kv
    end
  end
  env[#env + 1] = "PREFORK_FDS=" .. fds
  env[#env + 1] = "PREFORK_UPGRADE_FD=" .. upfd
  return env
end


--- USR2: the command line executed again, with the listening sockets;
-- once its workers are ready the new master says so and this one stops
-- (D.upgraded). The pid file is renamed .oldbin meanwhile.
function D.upgrade (self, why)
  if self.upgrading then
    core.log("warn", why .. ": an upgrade is under way; ignored")
    return
  end
  local fds, keep = listeners.handover(self.listeners)
  local a, b = core.socketpair()
  local upfd = core.dup(b:getfd())
  keep[#keep + 1] = upfd
  b:close()
  local exe, argv = core.cmdline()
  -- renamed before the new master runs: once it runs it may write its own
  -- pid file at any time (renamed after, it would be the new one's)
  local path = self.opts.pid_file
  if path then os.rename(path, path .. ".oldbin") end
  local pid, err = core.exec(exe, argv, environment(fds, upfd), keep)
  for _, fd in ipairs(keep) do core.close(fd) end
  if not pid then
    a:close()
    if path and pidin(path .. ".oldbin") == core.getpid() then
      os.rename(path .. ".oldbin", path)
    end
    core.log("error", why .. ": cannot start the new master: " .. err)
    return
  end
  self.upgrading = {pid = pid}
  self.core:upgrading(pid, core.dup(a:getfd()), self.opts.upgrade_timeout or 60)
  a:close()
  core.log("info", ("%s: upgrading: the new master (pid %d) starts"):format(why, pid))
end


--- The new master of an upgrade is ready (ok), or failed (why): this one
-- stops, or rolls back.
function D.upgraded (self, ok, why)
  local pid = self.upgrading and self.upgrading.pid
  self.upgrading = nil
  if ok then
    self.upgrades = self.upgrades + 1
    for _, l in ipairs(self.listeners) do l:own(false) end  -- its now
    if self.listeners.status then self.listeners.status:own(false) end
    core.log("info", ("upgrade: the new master (pid %d) is ready (%s); "
                      .. "this one stops"):format(pid, why))
    self.core:stop(true, "upgrade")
    return
  end
  if pid then core.kill(pid, "KILL") end
  local path = self.opts.pid_file
  if path and pidin(path .. ".oldbin") == core.getpid() then
    os.rename(path .. ".oldbin", path)
  end
  core.log("error", ("upgrade failed, this master goes on: the new master "
                     .. "(pid %d): %s"):format(pid or 0, why))
end

-- }======================================================


return D
