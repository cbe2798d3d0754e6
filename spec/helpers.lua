-- Helpers for the specs: real processes, real sockets on loopback, every
-- wait bounded, every process started here killed by its PID at the end.

local socket = require "socket"
local prefork = require "prefork"

local H = {}

-- orphans of the processes we start (workers of a killed master) become
-- our children, and we reap them: nothing is left for init
assert(prefork.subreaper(true))

H.lua = os.getenv("SPEC_LUA") or os.getenv("LUA") or "lua5.4"
H.valgrind = H.lua:match("valgrind") ~= nil  -- it catches every signal itself

-- the errnos that come third after nil and a word (Linux's numbers)
H.ETIMEDOUT, H.EMSGSIZE, H.EPROTO, H.ECANCELED = 110, 90, 71, 125

function H.now () return socket.gettime() end
function H.sleep (s) socket.sleep(s) end


--- Call fn until it returns a true value; raise after timeout seconds,
-- saying what (a string, or a function that makes it then).
function H.wait_until (fn, timeout, what)
  local deadline = H.now() + (timeout or 5)
  repeat
    local v = fn()
    if v then return v end
    H.sleep(0.01)
  until H.now() > deadline
  if type(what) == "function" then what = what() end  -- (said when it fails)
  -- (a '%' doubled: luaunit uses the message in a gsub)
  error(("timed out waiting for " .. (what or "a condition")):gsub("%%", "%%%%"), 2)
end


function H.readfile (path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end


function H.writefile (path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end


local tmpfiles = {}

function H.tmpname ()
  local name = os.tmpname()
  tmpfiles[#tmpfiles + 1] = name
  return name
end


-- Tools (curl, ps, wrk) run without the sanitizer runtime that `make asan`
-- preloads into Lua; H.lua (SPEC_LUA) puts it back for Lua processes.
local UNPRELOAD = "unset LD_PRELOAD; "

function H.sh (cmd)
  local p = io.popen(UNPRELOAD .. cmd, "r")
  local s = p:read("a")
  p:close()
  return s
end


-- {======================================================
-- Processes
-- =======================================================

--- State letter of a process ("R", "S", "Z", ...) or nil when gone.
function H.pstate (pid)
  local s = H.readfile("/proc/" .. pid .. "/stat")
  return s and s:match("%) (%a)")
end


--- CPU time of a process so far, user and system, in clock ticks (0 when
-- gone).
function H.cputicks (pid)
  local s = H.readfile("/proc/" .. pid .. "/stat") or ""
  -- after the state (field 3), ppid to cmajflt (4 to 13), then utime and
  -- stime (14, 15)
  local u, k = s:match("%) %a" .. (" %S+"):rep(10) .. " (%d+) (%d+)")
  return (tonumber(u) or 0) + (tonumber(k) or 0)
end


--- The children of pid: a list of {pid, state}.
function H.children (pid)
  local out = {}
  for line in H.sh("exec ps -o pid=,stat=,comm= --ppid " .. pid):gmatch("[^\n]+") do
    local p, st, comm = line:match("(%d+)%s+(%S+)%s+(%S+)")
    if p and comm ~= "ps" then  -- not the ps asking
      out[#out + 1] = {pid = tonumber(p), state = st:sub(1, 1)}
    end
  end
  return out
end


function H.childpids (pid)
  local out = {}
  for _, c in ipairs(H.children(pid)) do
    if c.state ~= "Z" then out[#out + 1] = c.pid end
  end
  table.sort(out)
  return out
end


--- Wait (bounded) until the master p has exactly n live workers; their pids.
function H.nworkers (p, n, timeout)
  return H.wait_until(function ()
    local k = H.childpids(p.pid)
    return #k == n and k
  end, timeout or 5, n .. " workers")
end


--- Wait (bounded) until n workers of the master p that are alive have
-- said "ready" in its log (stderr); their pids, sorted.
function H.ready (p, n, timeout)
  return H.wait_until(function ()
    local pids = {}
    for pid in p:err():gmatch("%(pid (%d+)%) ready\n") do
      pid = tonumber(pid)
      local st = H.pstate(pid)
      if st and st ~= "Z" then pids[#pids + 1] = pid end
    end
    table.sort(pids)
    return #pids == n and pids
  end, timeout or 5, n .. " ready workers")
end


function H.zombies (pid)
  local n = 0
  for _, c in ipairs(H.children(pid)) do
    if c.state == "Z" then n = n + 1 end
  end
  return n
end


-- The fds of pid as `ls -l` lists them, but for the pipe of the popen
-- that lists them: in this process its other end closes only as the
-- listing may already run (glibc's popen closes it after the exec).
local function lsfds (pid)
  return H.sh(("p=$(readlink /proc/$$/fd/1); ls -l /proc/%d/fd 2>/dev/null"
               .. " | grep -vF \"$p\""):format(pid))
end


function H.fdcount (pid)
  local n = 0
  for fd in lsfds(pid):gmatch(" (%d+) %->") do
    if tonumber(fd) < 1000 then n = n + 1 end  -- valgrind keeps its own above
  end
  return n
end


--- What the fds of pid point to: a set of "pipe:[123]", "/dev/null", ...
function H.fdtargets (pid)
  local t = {}
  for target in lsfds(pid):gmatch("%-> ([^\n]+)") do
    t[target] = true
  end
  return t
end


function H.cmdline (pid)
  local s = H.readfile("/proc/" .. pid .. "/cmdline") or ""
  return (s:gsub("%z+$", ""):gsub("%z", " "))
end


function H.kill (pid, sig)
  prefork.kill(pid, sig or "TERM")  -- it may be gone already
end


local Proc = {}
Proc.__index = Proc
local live = {}


--- Start a shell command with stdout and stderr to files. This process is
-- its parent (it reaps it in :wait or :stop).
function H.spawn (cmd)
  local p = setmetatable({outf = H.tmpname(), errf = H.tmpname()}, Proc)
  local script = H.tmpname()
  H.writefile(script, ("%secho $$\nexec %s >%s 2>%s </dev/null\n"):format(
              UNPRELOAD, cmd, p.outf, p.errf))
  p.h = io.popen("exec sh " .. script, "r")
  p.pid = tonumber(p.h:read("l"))
  live[p] = true
  return p
end

function Proc:out () return H.readfile(self.outf) or "" end
function Proc:err () return H.readfile(self.errf) or "" end

--- Wait (bounded) for a line of output matching pattern; its captures.
function Proc:expect (pattern, timeout, where)
  local caps
  H.wait_until(function ()
    caps = table.pack((where == "err" and self:err() or self:out()):match(pattern))
    if caps[1] == nil and self:exited() then
      error((("process exited before %q appeared; stderr:\n%s"):format(
            pattern, self:err()):gsub("%%", "%%%%")), 0)
    end
    return caps[1] ~= nil
  end, timeout or 10, function ()  -- (what came, for the failure's message)
    local text = where == "err" and self:err() or self:out()
    return ("%q in the %s; it has:\n%s"):format(pattern, where or "output",
                                                 text:sub(-1500))
  end)
  return table.unpack(caps, 1, caps.n)
end

function Proc:exited ()
  local st = H.pstate(self.pid)
  return st == nil or st == "Z"
end

--- Wait (bounded) for the exit: "exit"|"signal", code.
function Proc:wait (timeout)
  H.wait_until(function () return self:exited() end, timeout or 10,
               "process " .. self.pid .. " to exit")
  local _, how, code = self.h:close()
  live[self] = nil
  self.how, self.code = how, code
  return how, code
end

function Proc:kill (sig) H.kill(self.pid, sig) end

--- Reap (bounded) a process that became ours as an orphan.
function H.reap (pid, timeout)
  local deadline = H.now() + (timeout or 5)
  repeat
    local got, how = prefork.wait(pid, "nohang")
    if got or how ~= "running" then return got end
    H.sleep(0.01)
  until H.now() > deadline
  error("process " .. pid .. " did not exit", 2)
end


--- Kill the process and its children by PID, and reap them all.
function Proc:stop ()
  if not live[self] then return end
  local kids = H.childpids(self.pid)
  self:kill("KILL")
  self:wait(10)
  for _, k in ipairs(kids) do
    H.kill(k, "KILL")
    H.reap(k)
  end
end


--- Run Lua code as a master in its own process. The code gets `prefork`
-- and `announce(master)`, which prints "ADDR <first address>"; this
-- returns once that line appeared, with p.addr and p.port set.
function H.master (code, opts)
  opts = opts or {}
  local script = H.tmpname() .. ".lua"
  tmpfiles[#tmpfiles + 1] = script
  H.writefile(script, [[
prefork = require "prefork"
function announce (m)
  io.stdout:write("ADDR ", m:addresses()[1] or "-", "\n")
  io.stdout:flush()
end
]] .. code)
  local p = H.spawn((opts.prefix or "") .. H.lua .. " " .. script .. " "
                    .. (opts.args or ""))
  if opts.wait ~= false then
    p.addr = p:expect("ADDR (%S+)\n", opts.timeout)
    p.port = tonumber(p.addr:match(":(%d+)$"))
  end
  return p
end


--- A master serving on 127.0.0.1:0 in its own process, returned once o.workers
-- of its workers said "ready" (p.port, p.addr; p.pids: the ready workers).
-- o.code: the whole script (it calls prefork.start with on_start = announce);
-- or else the script is made of o.head (code before prefork.start),
-- o.options (more fields of prefork.start, as Lua source) and o.handler (Lua
-- source run for each connection `c` of the worker `w`: in a loop over
-- w:connections(), or with o.serve in w:serve(function (c) ... end));
-- o.worker: Lua source run first in each worker (its locals are the
-- handler's).
-- o.workers (2), o.accept (the strategy), o.listen (Lua source: "127.0.0.1:0"
-- by default; the first address gives p.port), o.ready = false: return without
-- waiting for readiness; o.prefix, o.args, o.timeout: as for H.master.
function H.server (o)
  local workers = o.workers or 2
  local code = o.code
  if not code then
    local body = o.serve
      and ("    w:serve(function (c)\n%s\n    end)\n"):format(o.handler)
      or ("    for c in w:connections() do\n%s\n    end\n"):format(o.handler)
    body = (o.worker or "") .. "\n" .. body
    code = ("%s\nprefork.start{workers = %d, listen = %s,%s\n"
            .. "  on_start = announce,\n%s\n  fork = function (w)\n%s  end}\n")
      :format(o.head or "", workers, o.listen or '"127.0.0.1:0"',
              o.accept and (" accept = %q,"):format(o.accept) or "",
              o.options or "", body)
  end
  local p = H.master(code, o)
  if o.ready ~= false then p.pids = H.ready(p, workers, o.timeout) end
  return p
end


--- Fork a child that runs fn once this process sleeps (blocked in a
-- call, state S): what fn does happens while the call waits. Its pid,
-- for prefork.wait (H.cleanup reaps it if a test failed before).
local forked = {}
function H.while_asleep (fn)
  local me = prefork.getpid()
  local pid = prefork.fork(function ()
    H.wait_until(function () return H.pstate(me) == "S" end, 10,
                 "the parent to sleep")
    fn()
  end)
  forked[#forked + 1] = pid
  return pid
end


local nprocdir  -- the module's copy that another uid can read

--- A setpriv/prlimit prefix running a command as a uid that no other
-- process uses (not nobody: other suites' processes would count against
-- the limit) with at most nproc processes. That uid may not read the
-- checkout (it can sit under a 0700 directory): the command loads a copy
-- of the module under test from a world-readable temporary directory.
function H.nproc_prefix (nproc)
  local uid = 50000 + prefork.getpid() % 10000
  while H.sh("ps -o pid= -U " .. uid) ~= "" do uid = uid + 1 end
  if not nprocdir then
    local core = assert(package.searchpath("prefork.core", package.cpath))
    local init = assert(package.searchpath("prefork", package.path))
    nprocdir = H.sh("mktemp -d /tmp/lpnproc.XXXXXX"):match("%S+")
    H.sh(("mkdir %s/prefork && cp %s %s/prefork/ && cp %s/*.lua %s/prefork/ "
          .. "&& chmod -R a+rX %s"):format(nprocdir, core, nprocdir,
          init:match("^(.*)/"), nprocdir, nprocdir))
  end
  return ("env LUA_PATH='%s/?.lua;%s/?/init.lua;;' LUA_CPATH='%s/?.so;;' "
          .. "setpriv --reuid=%d --regid=nogroup --clear-groups prlimit --nproc=%d ")
    :format(nprocdir, nprocdir, nprocdir, uid, nproc)
end


--- Kill everything this file started that is still there; remove files.
function H.cleanup ()
  for p in pairs(live) do p:stop() end
  for _, pid in ipairs(forked) do  -- reaped already, or now
    if prefork.wait(pid, "nohang") == nil and H.alive(pid) then
      H.kill(pid, "KILL")
      prefork.wait(pid)
    end
  end
  forked = {}
  for _, f in ipairs(tmpfiles) do os.remove(f) end
  tmpfiles = {}
  if nprocdir then
    H.sh("rm -rf " .. nprocdir)
    nprocdir = nil
  end
end

-- }======================================================


-- {======================================================
-- Clients
-- =======================================================

--- A LuaSocket connection to 127.0.0.1:port (raises if it fails).
function H.connect (port, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 10)
  assert(c:connect("127.0.0.1", port))
  return c
end


--- The number of keys of t.
function H.count (t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end


--- n connections held open at once, each sending line; what each answers
-- in its first line counted: {[answer] = times}, and the connections.
function H.ask (port, n, line)
  local cs, seen = {}, {}
  for i = 1, n do cs[i] = H.connect(port) end
  for i = 1, n do cs[i]:send(line .. "\n") end
  for i = 1, n do
    local answer = assert(cs[i]:receive("*l"))
    seen[answer] = (seen[answer] or 0) + 1
  end
  return seen, cs
end


--- All that a LuaSocket client c has left to read, once its peer closed.
function H.rest (c)
  local all, _, partial = c:receive("*a")
  return all or partial
end


--- Connect to 127.0.0.1:port, send data, read until the server closes.
function H.request (port, data, timeout, host)
  local c = socket.tcp()
  c:settimeout(timeout or 5)
  local ok, err = c:connect(host or "127.0.0.1", port)
  if not ok then return nil, err end
  if data then c:send(data) end
  local all, rerr, partial = c:receive("*a")
  c:close()
  if all then return all end
  if rerr == "closed" then return partial or "" end  -- closed, maybe mute
  return nil, rerr, partial
end


--- Like request, waiting (bounded) until a server answers.
function H.request_ok (port, data, timeout)
  local r
  H.wait_until(function ()
    r = H.request(port, data, 2)
    return r
  end, timeout or 5, "an answer on port " .. port)
  return r
end

-- }======================================================


-- {======================================================
-- Processes and ports (for the operation specs)
-- =======================================================

--- Is pid there (not a zombie)?
function H.alive (pid)
  local st = H.pstate(pid)
  return st ~= nil and st ~= "Z"
end


--- Every descendant of pid (children, their children, ...).
function H.descendants (pid)
  local out, todo = {}, {pid}
  while #todo > 0 do
    local p = table.remove(todo)
    for _, k in ipairs(H.childpids(p)) do
      out[#out + 1] = k
      todo[#todo + 1] = k
    end
  end
  return out
end


--- A TCP port on 127.0.0.1 that was free a moment ago.
function H.freeport ()
  local s = socket.bind("127.0.0.1", 0)
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- }======================================================

return H
