#!/usr/bin/env lua5.4
-- bench/chaos.lua [SECONDS]: reliability under load, bounded in time.
-- One line per scenario with its figures and PASS or FAIL; the exit code
-- is the number of failed scenarios. `make chaos` runs it for 30 s a
-- scenario; CI runs a short form.

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local H = require "helpers"
local lib = require "lib"
local prefork = require "prefork"
local socket = require "socket"

local SECONDS = tonumber(arg[1] or 30)
local GET = lib.GET
local freeport = lib.freeport
local failed = 0

local function server (workers, delay)
  local port = freeport()
  local p = H.spawn(("%s bench/hello.lua %d %d %s"):format(H.lua, port, workers,
                                                           delay or 0))
  p.port = port
  p:expect("listening", 10)
  H.wait_until(function () return #H.childpids(p.pid) == workers end, 10)
  return p
end

local function wrk (port, seconds)
  local h = io.popen(("unset LD_PRELOAD; wrk -t2 -c50 -d%ds -H 'Connection: close' "
                      .. "http://127.0.0.1:%d/ 2>&1"):format(seconds, port))
  return h
end

local function wrkresult (h)
  local out = h:read("a")
  h:close()
  local n, _, errs = lib.wrkstats(out)
  return n, errs
end

local function verdict (name, ok, figures)
  if not ok then failed = failed + 1 end
  io.stdout:write(("%-4s %-34s %s\n"):format(ok and "PASS" or "FAIL", name, figures))
  io.stdout:flush()
end


-- the connections a worker holds: the TCP connections it has open, and
-- those handed to it but not taken yet (accept = "master": the bytes
-- waiting on its channel, one a connection)
local function held (pid)
  local n, tag = 0, "pid=" .. pid .. ","
  for line in H.sh("ss -tnpH state established"):gmatch("[^\n]+") do
    if line:find(tag, 1, true) then n = n + 1 end
  end
  for line in H.sh("ss -xpnH"):gmatch("[^\n]+") do
    if line:find(tag, 1, true) then
      n = n + (tonumber(line:match("^%S+%s+%S+%s+(%d+)")) or 0)
    end
  end
  return n
end

-- 1. SIGKILL a random worker every 200 ms under load. A worker serves
-- many connections at once: it is frozen (STOP) first, so that the
-- connections it holds when it dies can be counted.
local function kills ()
  local p = server(4)
  H.request_ok(p.port, GET)
  local fds = H.fdcount(p.pid)
  local load = wrk(p.port, SECONDS + 1)
  H.sleep(0.5)
  local n, lost, deadline = 0, 0, H.now() + SECONDS
  while H.now() < deadline do
    local ws = H.childpids(p.pid)
    if #ws > 0 then
      local victim = ws[math.random(#ws)]
      H.kill(victim, "STOP")
      lost = lost + held(victim)
      H.kill(victim, "KILL")
      n = n + 1
    end
    H.sleep(0.2)
  end
  local requests, errors = wrkresult(load)
  local restored = pcall(H.wait_until, function ()
    return #H.childpids(p.pid) == 4
  end, 15)
  local alive = not p:exited()
  local zombies = H.zombies(p.pid)
  local fdsafter = H.fdcount(p.pid)
  verdict("kill -9 a worker every 200 ms", alive and restored and errors <= lost
          and zombies == 0 and fdsafter == fds,
    ("%d kills, %d requests, %d failed (at most the %d the killed held), set %s, "
     .. "%d zombies, master fds %d -> %d"):format(n, requests, errors, lost,
     restored and "restored" or "NOT restored", zombies, fds, fdsafter))
  p:kill("TERM")
  p:wait(10)
end


-- 2. SIGHUP every second under load: every worker is replaced each time
local function reloads ()
  local p = server(4)
  H.request_ok(p.port, GET)
  local load = wrk(p.port, SECONDS + 1)
  H.sleep(0.5)
  local n, deadline = 0, H.now() + SECONDS
  while H.now() < deadline do
    p:kill("HUP")
    n = n + 1
    H.sleep(1)
  end
  local requests, errors = wrkresult(load)
  local _, replaced = p:err():gsub("stopped: exit 0", "")
  verdict("SIGHUP every second", errors == 0 and not p:exited() and requests > 0,
    ("%d reloads, %d workers replaced, %d requests, %d failed"):format(
     n, replaced, requests, errors))
  p:kill("TERM")
  p:wait(10)
end


-- 3. SIGTERM under load: what a worker accepted completes. The server
-- sends "H" at once after reading a request, then the rest 50 ms later:
-- a client that got "H" was accepted, and must get the whole answer.
local function client (port, until_t, out)
  local got, complete, cut, refused = 0, 0, 0, 0
  while socket.gettime() < until_t do
    local c = socket.tcp()
    c:settimeout(5)
    if c:connect("127.0.0.1", port) then
      c:send(GET)
      local all, _, partial = c:receive("*a")
      local data = all or partial or ""
      if data:sub(1, 1) == "H" then
        got = got + 1
        if data:find("Hello, World!", 1, true) then complete = complete + 1
        else cut = cut + 1 end
      end
    else
      refused = refused + 1
      socket.sleep(0.01)
    end
    c:close()
  end
  H.writefile(out, ("%d %d %d %d"):format(got, complete, cut, refused))
end

local function term ()
  local p = server(4, 0.05)
  H.request_ok(p.port, GET)
  local t_end = H.now() + math.min(SECONDS, 10) + 2
  local kids, outs = {}, {}
  for i = 1, 8 do
    outs[i] = H.tmpname()
    kids[i] = prefork.fork(client, p.port, t_end, outs[i])
  end
  H.sleep(math.min(SECONDS, 10))
  p:kill("TERM")
  local how, code = p:wait(40)
  local got, complete, cut, refused = 0, 0, 0, 0
  for i = 1, 8 do
    prefork.wait(kids[i])
    local a, b, c, d = (H.readfile(outs[i]) or ""):match("(%d+) (%d+) (%d+) (%d+)")
    got, complete = got + (a or 0), complete + (b or 0)
    cut, refused = cut + (c or 0), refused + (d or 0)
  end
  verdict("SIGTERM under load", cut == 0 and complete > 0 and how == "exit"
          and code == 0,
    ("%d accepted, %d completed, %d cut off, master %s %s"):format(
     got, complete, cut, how, code))
end


-- prefork.interp: calls through Debian's prefork-interp in 3 loops while
-- executors and the server are killed with -9 at random. Every caller
-- gets its answer or a clean error (the wrapper's exit 127, or the
-- executor's death by KILL passed on); none hangs (each call is bounded
-- by timeout: 124 would say it hung); afterwards nothing is left.
local function interp ()
  local seconds = math.min(SECONDS, 15)
  local dir = H.sh("mktemp -d /tmp/chaos_interp.XXXXXX"):match("%S+")
  H.writefile(dir .. "/c.lua", [[
local interp = require "prefork.interp"
local prefork = require "prefork"
interp.initialisation_complete{max_servers = 8}
local f = io.open("/proc/self/stat")
local ppid = f:read("a"):match("%) %a (%d+)")
f:close()
f = io.open("servers", "a") f:write(ppid, "\n") f:close()
prefork.sleep(0.02 + (prefork.getpid() % 50) / 1000)
io.stdout:write("ok\n")
]])
  local loops = {}
  for k = 1, 3 do
    local sh = dir .. "/loop" .. k .. ".sh"
    H.writefile(sh, ([[
cd %s || exit 1
end=$(($(date +%%s) + %d))
while [ "$(date +%%s)" -lt "$end" ]; do
  timeout 20 /usr/bin/prefork-interp -U,lua5.4 c.lua >o.%d 2>e.%d
  echo "$? $(head -c 2 o.%d)" >>r.%d
done
]]):format(dir, seconds, k, k, k, k))
    loops[k] = H.spawn("sh " .. sh)
  end
  local servers, kills = {}, {executor = 0, server = 0}
  local function current ()
    local last
    for l in (H.readfile(dir .. "/servers") or ""):gmatch("%d+") do
      last = tonumber(l)
      servers[last] = true
    end
    return last
  end
  local t_end = H.now() + seconds
  math.randomseed(os.time())
  while H.now() < t_end do
    H.sleep(0.05 + math.random() * 0.2)
    local s = current()
    if s and H.cmdline(s):match("c%.lua %[server%]") then
      if math.random() < 0.25 then
        H.kill(s, "KILL")
        kills.server = kills.server + 1
      else
        local ex = H.childpids(s)
        if #ex > 0 then
          H.kill(ex[math.random(#ex)], "KILL")
          kills.executor = kills.executor + 1
        end
      end
    end
  end
  for _, p in ipairs(loops) do p:wait(40) end
  current()
  local counts, bad = {}, 0
  for k = 1, 3 do
    for rc, out in (H.readfile(dir .. "/r." .. k) or ""):gmatch("(%d+) ?(%a*)\n") do
      local key = rc == "0" and (out == "ok" and "answered" or "empty") or ("rc " .. rc)
      counts[key] = (counts[key] or 0) + 1
      if not (rc == "0" and out == "ok" or rc == "127" or rc == "137" or rc == "130") then
        bad = bad + 1
      end
    end
  end
  -- what is left: the last server and the wrappers' watchers; kill the
  -- servers by pid, then the watchers must go by themselves
  local function under ()
    local t = {}
    for pid, cwd in H.sh("ls -l /proc/[0-9]*/cwd 2>/dev/null"):gmatch("/proc/(%d+)/cwd %-> ([^\n]+)") do
      local st = H.pstate(pid)
      if cwd == dir and st and st ~= "Z" then t[#t + 1] = tonumber(pid) end
    end
    return t
  end
  for s in pairs(servers) do
    if H.cmdline(s):match("c%.lua %[server%]") then H.kill(s, "KILL") end
  end
  local clean = pcall(H.wait_until, function () return #under() == 0 end, 10)
  for s in pairs(servers) do prefork.wait(s, "nohang") end
  local left = under()
  for _, pid in ipairs(left) do H.kill(pid, "KILL") end
  H.sh(("cd %s && /usr/bin/prefork-interp --kill,-U,lua5.4 c.lua; cd / && rm -rf %s"):format(dir, dir))
  local parts = {}
  for k, v in pairs(counts) do parts[#parts + 1] = k .. " " .. v end
  table.sort(parts)
  verdict("interp: kill -9 of executors and servers under calls",
    bad == 0 and (counts.answered or 0) > 0 and clean,
    ("%s; %d executors and %d servers killed, %d servers; %d unexpected; %s left")
      :format(table.concat(parts, ", "), kills.executor, kills.server, H.count(servers), bad,
              clean and "nothing" or (#left .. " processes")))
end



-- 5. A worker that hangs every few seconds under load: it is replaced
-- (timeout = 1) and the requests to the other workers go on; only the
-- connections the hung worker held fail.
local HANGS = [[
local prefork = require "prefork"
local HEAD = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
prefork.start{workers = 4, listen = "127.0.0.1:" .. arg[1], timeout = 1,
  fork = function (w)
    w:serve(function (c)
      while true do
        local line = c:read("l")
        if not line then return end
        local hang = line:find("/hang", 1, true)
        repeat line = c:read("l") until not line or line == "\r" or line == ""
        if hang then while true do end end
        if not c:write(HEAD) then return end
      end
    end)
  end}
]]

local function hangs ()
  local port, script = freeport(), H.tmpname() .. ".lua"
  H.writefile(script, HANGS)
  local p = H.spawn(("%s %s %d"):format(H.lua, script, port))
  H.ready(p, 4, 10)
  local load = io.popen(("unset LD_PRELOAD; wrk -t2 -c50 -d%ds http://127.0.0.1:%d/ 2>&1")
                        :format(SECONDS + 1, port))
  H.sleep(0.5)
  local n, deadline = 0, H.now() + SECONDS
  while H.now() < deadline do
    local c = socket.connect("127.0.0.1", port)
    if c then c:send("GET /hang HTTP/1.1\r\n\r\n") end
    n = n + 1
    H.sleep(math.min(3, SECONDS / 2))
    if c then c:close() end
  end
  local requests, errors = wrkresult(load)
  local _, timedout = p:err():gsub("timed out: exit 124", "")
  local restored = pcall(H.ready, p, 4, 10)
  verdict("a worker hangs every few seconds", not p:exited() and restored
          and timedout >= n - 1 and requests > 0 and errors <= 50 * n,
    ("%d hangs, %d replaced after their traceback, %d requests, %d failed "
     .. "(at most the 50 a hung worker can hold, each)"):format(
     n, timedout, requests, errors))
  p:kill("TERM")
  p:wait(40)
end


-- 6. A storm of the signals the master ignores, and USR1, under load
local function storm ()
  local p = server(4)
  H.request_ok(p.port, GET)
  local pids = H.childpids(p.pid)
  local load = wrk(p.port, math.min(SECONDS, 10) + 1)
  local sigs = {"USR1", "ALRM", "PIPE", "WINCH", "VTALRM", "PROF", "IO", "URG"}
  local n, deadline = 0, H.now() + math.min(SECONDS, 10)
  while H.now() < deadline do
    p:kill(sigs[n % #sigs + 1])
    n = n + 1
    H.sleep(0.005)
  end
  local requests, errors = wrkresult(load)
  local same = table.concat(H.childpids(p.pid), ",") == table.concat(pids, ",")
  verdict("a storm of USR1 ALRM PIPE WINCH ...", not p:exited() and same
          and errors == 0 and requests > 0,
    ("%d signals, master %s, workers %s, %d requests, %d failed"):format(n,
     p:exited() and "DEAD" or "alive", same and "the same" or "CHANGED",
     requests, errors))
  p:kill("TERM")
  p:wait(40)
end


-- 7. 10 HUPs and 3 USR2 upgrades under keep-alive load against
-- examples/http.lua: no request fails (a stopping worker answers the
-- request in hand with Connection: close; idle ones get a last chance)
local function upgrades ()
  local port = freeport()
  local p = H.spawn(("env WORKERS=4 %s examples/http.lua %d"):format(H.lua, port))
  p:expect("master (%d+)%)", 10)
  H.ready(p, 4, 10)
  local seconds = math.max(13, math.min(SECONDS, 20))
  local load = io.popen(("unset LD_PRELOAD; wrk -t2 -c50 -d%ds http://127.0.0.1:%d/ 2>&1")
                        :format(seconds, port))
  H.sleep(0.5)
  local master, huh = p.pid, 0
  for i = 1, 13 do
    if i % 4 == 0 then
      H.kill(master, "USR2")
      local before = master
      H.wait_until(function ()
        local last
        for m in p:out():gmatch("%(master (%d+)%)") do last = tonumber(m) end
        master = last
        return master ~= before and not H.alive(before)
      end, 30, "the new master")
      huh = huh + 1
    else
      H.kill(master, "HUP")
    end
    H.sleep((seconds - 2) / 13)
  end
  local requests, errors = wrkresult(load)
  verdict("10 HUPs, 3 USR2 under keep-alive", errors == 0 and requests > 0
          and huh == 3,
    ("%d requests, %d failed, %d upgrades, master %d -> %d"):format(requests,
     errors, huh, p.pid, master))
  H.kill(master, "TERM")
  H.wait_until(function () return not H.alive(master) end, 40, "the last master")
  p:wait(10)
end


-- 8. fd exhaustion: 64 fds, 200 idle connections; the workers pause
-- accepting instead of spinning, and say so once
local function fdexhaustion ()
  local port = freeport()
  local p = H.spawn(("prlimit --nofile=64 %s bench/hello.lua %d 2"):format(H.lua, port))
  p:expect("listening", 10)
  local pids = H.ready(p, 2, 10)
  local function cpu ()
    local t = 0
    for _, pid in ipairs(pids) do t = t + H.cputicks(pid) end
    return t / 100
  end
  local cpu0, bytes0 = cpu(), #p:err()
  local cs = {}
  for i = 1, 200 do cs[i] = socket.connect("127.0.0.1", port) end
  local seconds = math.min(SECONDS, 10)
  H.sleep(seconds)
  local used, logged = cpu() - cpu0, #p:err() - bytes0
  for _, c in ipairs(cs) do c:close() end
  local served = pcall(H.request_ok, port, GET, 10)
  verdict("fd exhaustion (64 fds, 200 idle)", used < 0.1 * seconds
          and logged < 4096 and served,
    ("%.2f CPU s over %d s (2 workers), %d log bytes, served after: %s"):format(
     used, seconds, logged, tostring(served)))
  p:kill("TERM")
  p:wait(40)
end


-- 9. The master killed with -9 while one worker spins and one waits in
-- os.execute: every worker and what it started goes within a second
local BUSY = [[
local prefork = require "prefork"
prefork.start{workers = 2, listen = "127.0.0.1:" .. arg[1], timeout = false,
  fork = function (w)
    w:serve(function (c)
      if c:read("l") == "spin" then while true do end end
      os.execute("sleep 1000")
    end)
  end}
]]

local function masterkill ()
  local port, script = freeport(), H.tmpname() .. ".lua"
  H.writefile(script, BUSY)
  local p = H.spawn(("%s %s %d"):format(H.lua, script, port))
  local pids = H.ready(p, 2, 10)
  local a, b = socket.connect("127.0.0.1", port), socket.connect("127.0.0.1", port)
  a:send("spin\n")
  b:send("sleep\n")
  local all = H.wait_until(function ()
    local t = {}
    for _, w in ipairs(pids) do
      t[#t + 1] = w
      for _, k in ipairs(H.descendants(w)) do t[#t + 1] = k end
    end
    return #t >= 4 and t  -- the workers, sh and sleep
  end, 5, "sh and sleep")
  local t0 = H.now()
  p:kill("KILL")
  local gone = pcall(H.wait_until, function ()
    for _, pid in ipairs(all) do if H.alive(pid) then return false end end
    return true
  end, 5)
  local took = H.now() - t0
  p:wait(5)
  a:close() b:close()
  verdict("master kill -9 while workers are busy", gone and took <= 1.5,
    ("%d processes (workers, sh, sleep), the last gone after %.2f s"):format(#all, took))
end


local scenarios = {kills, reloads, term, interp, hangs, storm, upgrades,
                   fdexhaustion, masterkill}
local ok, err = pcall(function ()
  for _, run in ipairs(scenarios) do run() end
end)
H.cleanup()
if not ok then
  io.stdout:write("FAIL chaos run: ", tostring(err), "\n")
  failed = failed + 1
end
io.stdout:write(("chaos: %d passed, %d failed\n"):format(
  #scenarios - math.min(failed, #scenarios), failed))
os.exit(failed == 0 and 0 or 1)
