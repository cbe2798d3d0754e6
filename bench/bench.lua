#!/usr/bin/env lua5.4
-- bench/bench.lua [--quick] [CASE ...]: every case side by side with its
-- peers, in one run, alternating, repeated; medians and ratios. Writes
-- bench/results.md and bench/results.png. Run it with `make bench`.
--
-- A case is {name, title, unit, better = "higher"|"lower", run = fn(B)}
-- where run returns {[peer] = {samples...}}; cases register with
-- B.case{...}. Later cases (interp, pool) plug in the same way.

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local H = require "helpers"
local lib = require "lib"
local prefork = require "prefork"

local B = {cases = {}, results = {}}
local quick = false
local wanted = {}
for _, a in ipairs(arg) do
  if a == "--quick" then quick = true else wanted[a] = true end
end

B.quick = quick
B.H = H
B.rounds = quick and 1 or 3
B.seconds = quick and 1 or 3
-- the HTTP cases' rounds: one sample varies by 30 % on a shared 2-vCPU VM
-- (wrk and the server share its two CPUs), and a 1.1 x target needs more
-- than a median of three
B.http_rounds = quick and 1 or 5

function B.case (c) B.cases[#B.cases + 1] = c end

function B.say (...)
  io.stdout:write(os.date("%H:%M:%S "), table.concat({...}, " "), "\n")
  io.stdout:flush()
end


-- {======================================================
-- Helpers
-- =======================================================

function B.median (t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local n = #s
  if n == 0 then return nil end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

--- the resident size (MB) of a process ("self" for this one), or nil
function B.rssmb (pid)
  local kb = (H.readfile("/proc/" .. pid .. "/status") or ""):match("VmRSS:%s*(%d+)")
  return kb and tonumber(kb) / 1024
end

B.freeport = lib.freeport
local GET = lib.GET

--- Start a server command line; return it once it answers on port.
function B.server (name, cmd, port)
  local p = H.spawn(cmd)
  p.name, p.port = name, port
  local ok = pcall(H.request_ok, port, GET, 30)
  if not ok then
    p:stop()
    error(("%s did not come up on port %d: %s"):format(name, port, p:err()))
  end
  return p
end

--- Stop a server: TERM, then KILL for it and for any worker left
function B.stop (p)
  local kids = H.childpids(p.pid)
  p:kill("TERM")
  local ok = pcall(p.wait, p, 5)
  if not ok then p:stop() end
  for _, k in ipairs(kids) do
    if H.pstate(k) and H.pstate(k) ~= "Z" then H.kill(k, "KILL") end
    pcall(H.reap, k, 2)
  end
end

--- wrk against a URL: req/s, errors (socket errors and non-2xx), its
-- output, and the requests it made
function B.wrk (port, seconds, close)
  local out = H.sh(("wrk -t2 -c50 -d%ds %s http://127.0.0.1:%d/ 2>&1"):format(
    seconds, close and "-H 'Connection: close'" or "", port))
  local n, rps, errs = lib.wrkstats(out)
  return rps, errs, out, n
end

local root = H.sh("pwd"):gsub("\n", "")
local tmp = H.tmpname() .. ".d"
H.sh("mkdir -p " .. tmp)

-- the peers of the HTTP cases: name -> command line for (port, workers)
B.http_peers = {
  {"lua-prefork", function (port, n)
    return ("env QUIET=1 %s bench/hello.lua %d %d"):format(H.lua, port, n)
  end},
  {"lua-prefork (accept=reuseport)", function (port, n)
    return ("env QUIET=1 ACCEPT=reuseport %s bench/hello.lua %d %d"):format(H.lua, port, n)
  end},
  {"lua-prefork (accept=mutex)", function (port, n)
    return ("env QUIET=1 ACCEPT=mutex %s bench/hello.lua %d %d"):format(H.lua, port, n)
  end},
  {"lua-prefork (accept=master)", function (port, n)
    return ("env QUIET=1 ACCEPT=master %s bench/hello.lua %d %d"):format(H.lua, port, n)
  end},
  {"lua-prefork (standby = 1)", function (port, n)  -- the respawn case's
    return ("env QUIET=1 STANDBY=1 %s bench/hello.lua %d %d"):format(H.lua, port, n)
  end, optin = true},
  {"nginx", function (port, n)
    local prefix = tmp .. "/nginx-" .. port
    H.sh("mkdir -p " .. prefix)
    local conf = H.readfile("bench/peers/nginx.conf"):gsub("@PORT@", port)
      :gsub("@PREFIX@", prefix):gsub("worker_processes 2", "worker_processes " .. n)
    H.writefile(prefix .. "/nginx.conf", conf)
    return ("nginx -p %s -c %s/nginx.conf"):format(prefix, prefix)
  end},
  {"node cluster", function (port, n)
    return ("node bench/peers/node_cluster.js %d %d"):format(port, n)
  end},
  {"unicorn", function (port, n)
    return ("env WORKERS=%d unicorn -E none -c bench/peers/unicorn.rb -l 127.0.0.1:%d "
            .. "bench/peers/hello.ru"):format(n, port)
  end},
  {"gunicorn", function (port, n)
    return ("gunicorn -w %d -k sync -b 127.0.0.1:%d --chdir bench/peers "
            .. "hello_wsgi:app"):format(n, port)
  end},
  {"POE prefork", function (port, n)
    return ("perl bench/peers/poe_prefork.pl %d %d"):format(port, n)
  end},
}

--- Start every HTTP peer with n workers; {name -> proc}
function B.start_http (n, only)
  local servers = {}
  for _, peer in ipairs(B.http_peers) do
    local name, cmd = peer[1], peer[2]
    if (not only and not peer.optin) or (only and only[name]) then
      local port = B.freeport()
      local ok, p = pcall(B.server, name, cmd(port, n), port)
      if ok then servers[#servers + 1] = p
      else B.say("  skipped " .. name .. ": " .. tostring(p):sub(1, 200)) end
    end
  end
  return servers
end

function B.stop_all (servers)
  for _, p in ipairs(servers) do B.stop(p) end
end

--- The worker pids of a master (its children; node's and nginx's too; a
-- standby, titled so, is none)
function B.workers (p)
  local w = {}
  for _, pid in ipairs(H.childpids(p.pid)) do
    if not (H.readfile("/proc/" .. pid .. "/cmdline") or ""):find("standby") then
      w[#w + 1] = pid
    end
  end
  return w
end

-- }======================================================


-- {======================================================
-- Cases
-- =======================================================

--- the CPU ticks of each pid: {[pid] = ticks}
local function ticks (pids)
  local t = {}
  for _, pid in ipairs(pids) do t[pid] = H.cputicks(pid) end
  return t
end

--- the busiest worker's share (%) of the workers' CPU between two
-- ticks(), and the workers' CPU in all (ticks)
local function busiest (t0, t1)
  local sum, top = 0, 0
  for pid, v in pairs(t1) do
    local d = v - (t0[pid] or v)
    sum = sum + d
    if d > top then top = d end
  end
  return sum > 0 and 100 * top / sum or 0, sum
end

local TICK = tonumber(H.sh("getconf CLK_TCK")) or 100

local function http_case (name, title, close, note)
  local case = {name = name, title = title, unit = "req/s", better = "higher", note = note,
    target = {peer = "nginx", ratio = 1.1}}  -- design.md 4, both modes
  case.run = function ()
    local servers = B.start_http(2)
    local samples, errors, shares, costs = {}, {}, {}, {}
    for r = 1, B.http_rounds do
      for _, p in ipairs(servers) do
        local pids = B.workers(p)
        local t0 = ticks(pids)
        local rps, errs, _, n = B.wrk(p.port, B.seconds, close)
        local share, used = busiest(t0, ticks(pids))
        local cost = n > 0 and used / TICK / n * 1e6 or 0  -- µs of CPU a request
        samples[p.name] = samples[p.name] or {}
        table.insert(samples[p.name], rps)
        shares[p.name] = (shares[p.name] or "") .. (" %.0f"):format(share)
        costs[p.name] = costs[p.name] or {}
        table.insert(costs[p.name], cost)
        errors[p.name] = (errors[p.name] or 0) + errs
        B.say(("  round %d %-13s %9.0f req/s  %d errors  busiest worker %.0f %%  %.1f µs CPU a request")
              :format(r, p.name, rps, errs, share, cost))
      end
    end
    B.stop_all(servers)
    local lines, cpu = {}, {}  -- how evenly each spread the load; its cost
    for _, peer in ipairs({"lua-prefork", "nginx"}) do
      if shares[peer] then lines[#lines + 1] = peer .. ":" .. shares[peer] end
      if costs[peer] then cpu[#cpu + 1] = ("%s %.1f"):format(peer, B.median(costs[peer])) end
    end
    case.note = (note and note .. " " or "") .. "The busiest worker's share of "
      .. "the two workers' CPU time, round by round (50 is an even split, 100 "
      .. "one worker doing everything): " .. table.concat(lines, "; ") .. ". "
      .. "The workers' CPU time (user + system) per request, median of the rounds: "
      .. table.concat(cpu, " µs, ") .. " µs (wrk shares the two CPUs: what "
      .. "a server does not use, wrk does)."
    return samples, errors
  end
  B.case(case)
end

http_case("http_keepalive", "HTTP hello, 2 workers, wrk -t2 -c50, keep-alive", false,
  "lua-prefork's hello (bench/hello.lua) runs worker:serve, a coroutine per "
  .. "connection; both it and nginx accept with TCP_DEFER_ACCEPT (defer_accept, "
  .. "listen ... deferred).")
http_case("http_close", "HTTP hello, 2 workers, wrk -t2 -c50, Connection: close", true)


B.case{name = "respawn", title = "respawn: SIGKILL of the only worker until its replacement answers (errors: requests lost)",
  unit = "ms", better = "lower", target = {max = 2, who = "lua-prefork (standby = 1)"},
  note = "lua-prefork (standby = 1) keeps a worker forked ahead, which takes the "
    .. "dead one's place: the fork is off the respawn's path (docs/operating.md). "
    .. "Node cluster's primary accepts and hands each connection to a worker: "
    .. "the request that arrives as its worker dies is lost (no answer in 2 s).",
  run = function ()
    local only = {["lua-prefork"] = true, ["lua-prefork (standby = 1)"] = true,
                  nginx = true, ["node cluster"] = true, unicorn = true, gunicorn = true}
    local servers = B.start_http(1, only)
    local samples, errors = {}, {}
    H.sleep(1.2)
    for k = 1, quick and 2 or 7 do
      for _, p in ipairs(servers) do
        local w = B.workers(p)
        if #w == 1 then
          local t0 = H.now()
          H.kill(w[1], "KILL")
          local ok = H.request(p.port, GET, 2)  -- a lost request: 2 s, not more
          local ms = (H.now() - t0) * 1000
          samples[p.name] = samples[p.name] or {}
          if ok then table.insert(samples[p.name], ms)
          else errors[p.name] = (errors[p.name] or 0) + 1 end  -- request lost
        end
      end
      B.say(("  kill %d done"):format(k))
      H.sleep(1.2)  -- past the first second: no backoff applies
    end
    B.stop_all(servers)
    return samples, errors
  end}


B.case{name = "hang", title = "hung worker (timeout 2 s): GET /hang spins until the worker is replaced and a new one answers",
  unit = "ms", better = "lower", target = {max = 3000},
  note = "From the GET /hang that makes the only worker spin in its handler, to "
    .. "the first answer of its replacement (lua-prefork: timeout = 2, which also "
    .. "logs the Lua traceback; gunicorn --timeout 2; unicorn timeout 3, its least).",
  run = function ()
    local peers = {
      {"lua-prefork", function (port)
        return ("env QUIET=1 TIMEOUT=2 %s bench/hello.lua %d 1"):format(H.lua, port) end},
      {"gunicorn", function (port)
        return ("gunicorn -w 1 -k sync --timeout 2 -b 127.0.0.1:%d --chdir bench/peers "
                .. "hang_wsgi:app"):format(port) end},
      {"unicorn", function (port)
        H.writefile(tmp .. "/unicorn-hang.rb", "worker_processes 1\ntimeout 3\n")
        return ("unicorn -E none -c %s/unicorn-hang.rb -l 127.0.0.1:%d bench/peers/hang.ru")
               :format(tmp, port) end},
    }
    local samples, errors = {}, {}
    for r = 1, quick and 1 or 3 do
      for _, peer in ipairs(peers) do
        local port = B.freeport()
        local ok, p = pcall(B.server, peer[1], peer[2](port), port)
        if ok then
          local t0 = H.now()
          local c = require("socket").connect("127.0.0.1", port)
          c:send("GET /hang HTTP/1.0\r\n\r\n")
          H.sleep(0.05)  -- the worker spins
          local answered = pcall(H.wait_until, function ()
            return H.request(port, GET, 1)
          end, 15)
          c:close()
          samples[peer[1]] = samples[peer[1]] or {}
          if answered then table.insert(samples[peer[1]], (H.now() - t0) * 1000)
          else errors[peer[1]] = (errors[peer[1]] or 0) + 1 end
          B.say(("  round %d %-12s %s"):format(r, peer[1], answered
                and ("%.0f ms"):format(samples[peer[1]][#samples[peer[1]]]) or "not replaced"))
          B.stop(p)
        end
      end
    end
    return samples, errors
  end}


B.case{name = "heartbeat", title = "the heartbeat's cost: HTTP hello keep-alive, 2 workers, timeout on (default 30 s) against timeout = false",
  unit = "req/s", better = "higher",
  note = "The same bench/hello.lua; with timeout on each loop turn, accept and "
    .. "read or write stamps the worker's heartbeat (a coarse clock, no system call).",
  run = function ()
    local variants = {
      {"timeout on (30 s)", "TIMEOUT=30"},
      {"timeout = false", "TIMEOUT_OFF=1"},
    }
    local samples = {}
    local servers = {}
    for _, v in ipairs(variants) do
      local port = B.freeport()
      servers[#servers + 1] = B.server(v[1], ("env QUIET=1 %s %s bench/hello.lua %d 2")
                                       :format(v[2], H.lua, port), port)
    end
    for r = 1, B.rounds do
      for _, p in ipairs(servers) do
        local rps = B.wrk(p.port, B.seconds, false)
        samples[p.name] = samples[p.name] or {}
        table.insert(samples[p.name], rps)
        B.say(("  round %d %-20s %9.0f req/s"):format(r, p.name, rps))
      end
    end
    B.stop_all(servers)
    return samples
  end}


B.case{name = "startup64", title = "start-up of 64 workers: launch until 64 workers exist and one answers",
  unit = "ms", better = "lower",
  run = function ()
    local samples = {}
    local only = {["lua-prefork"] = true, nginx = true, unicorn = true,
                  gunicorn = true, ["node cluster"] = true}
    for r = 1, quick and 1 or 3 do
      for _, peer in ipairs(B.http_peers) do
        local name = peer[1]
        if only[name] then
          local port = B.freeport()
          local t0 = H.now()
          local p = H.spawn(peer[2](port, 64))
          local ok = pcall(H.wait_until, function ()
            return #H.childpids(p.pid) >= 64 and H.request(port, GET, 1)
          end, 60)
          if ok then
            samples[name] = samples[name] or {}
            table.insert(samples[name], (H.now() - t0) * 1000)
          end
          B.stop(p)
          B.say(("  round %d %-13s %s"):format(r, name,
                ok and ("%.0f ms"):format(samples[name][#samples[name]]) or "failed"))
        end
      end
    end
    return samples
  end}


B.case{name = "idle", title = "idle master: context switches over 10 s with 2 idle workers (default options: lua-prefork's timeout is on)",
  unit = "wake-ups", better = "lower", target = {max = 0},
  note = "A worker's watchdog is armed only while it is busy: once every worker "
    .. "is idle, the master has no timer left (a last expiry per worker finds it "
    .. "idle and disarms). gunicorn's arbiter wakes every second.",
  run = function ()
    local only = {["lua-prefork"] = true, nginx = true, unicorn = true,
                  gunicorn = true, ["node cluster"] = true}
    local servers = B.start_http(2, only)
    H.sleep(2)
    local function switches (pid)
      local s = H.readfile("/proc/" .. pid .. "/status") or ""
      return (tonumber(s:match("\nvoluntary_ctxt_switches:%s*(%d+)")) or 0)
        + (tonumber(s:match("nonvoluntary_ctxt_switches:%s*(%d+)")) or 0)
    end
    local before = {}
    for _, p in ipairs(servers) do before[p.name] = switches(p.pid) end
    H.sleep(quick and 3 or 10)
    local samples = {}
    for _, p in ipairs(servers) do
      samples[p.name] = {switches(p.pid) - before[p.name]}
    end
    B.stop_all(servers)
    return samples
  end}


B.case{name = "memory", title = "private memory per worker (MB) after 500 requests, 50 MB Lua heap preloaded",
  unit = "MB", better = "lower",
  note = "Private_Dirty + Private_Clean from /proc/PID/smaps_rollup. The preloaded "
    .. "heap stays shared until the worker's garbage collector walks it: a full "
    .. "collection writes to every object's header and copies every page.",
  run = function ()
    local samples = {}
    for _, variant in ipairs{
        {"lua-prefork, 50 MB preloaded", 50, 0},
        {"lua-prefork, 50 MB preloaded, full GC in each worker", 50, 1},
        {"lua-prefork, nothing preloaded", 0, 0}} do
      local port = B.freeport()
      local p = B.server(variant[1], ("env QUIET=1 PRELOAD_MB=%d FULLGC=%d %s bench/hello.lua %d 2")
                         :format(variant[2], variant[3], H.lua, port), port)
      for _ = 1, 500 do H.request(port, GET, 5) end
      local mb = {}
      for _, w in ipairs(B.workers(p)) do
        local s = H.readfile("/proc/" .. w .. "/smaps_rollup") or ""
        local kb = (tonumber(s:match("Private_Dirty:%s*(%d+)")) or 0)
          + (tonumber(s:match("Private_Clean:%s*(%d+)")) or 0)
        mb[#mb + 1] = kb / 1024
      end
      local s = H.readfile("/proc/" .. p.pid .. "/smaps_rollup") or ""
      B.say(("  %s: master Rss %.1f MB, workers %s MB"):format(variant[1],
            (tonumber(s:match("Rss:%s*(%d+)")) or 0) / 1024,
            table.concat((function () local t = {} for i, v in ipairs(mb) do
              t[i] = ("%.1f"):format(v) end return t end)(), ", ")))
      samples[variant[1]] = mb
      B.stop(p)
    end
    return samples
  end}

-- the cases of their own files: bench/case_*.lua
do
  local p = io.popen("ls bench/case_*.lua 2>/dev/null")
  for f in p:lines() do assert(loadfile(f))(B) end
  p:close()
end

-- }======================================================


-- {======================================================
-- Report
-- =======================================================

local function version (cmd)
  return (H.sh(cmd .. " 2>&1"):match("[^\n]*") or "?")
end

--- what fork and a page fault cost on this machine, measured now: the
-- floor of the respawn and interp figures, which vary between virtual
-- machines of one kind by 2 x (page-table work is dear on some)
local function floor ()
  local t = {}
  for i = 1, 262144 do t[i] = i end  -- 4 MB of array: 256 slots a page
  local forks, faults = {}, {}
  for k = 1, 30 do
    local t0 = H.now()
    prefork.wait(prefork.fork(function () end))
    forks[k] = (H.now() - t0) * 1000
  end
  for k = 1, 10 do
    local mine, child = prefork.socketpair()
    local pid = prefork.fork(function ()
      local t0 = H.now()
      for i = 1, 500 do t[i * 512] = 0 end  -- 500 pages, each copied on write
      child:write(("%.9f\n"):format((H.now() - t0) / 500))
    end)
    faults[k] = (tonumber(mine:read("l")) or 0) * 1e6
    mine:close() child:close()
    prefork.wait(pid)
  end
  return ("Machine floor, measured in this run: fork, exit and wait of the "
    .. "bench's Lua process (%.0f MB resident) %.2f ms; a copy-on-write page fault "
    .. "%.1f µs (medians)"):format(B.rssmb("self") or 0, B.median(forks), B.median(faults))
end

local function machine ()
  local cpu = (H.readfile("/proc/cpuinfo") or ""):match("model name%s*:%s*([^\n]+)") or "?"
  return {
    ("%s, %s cores, %s"):format(cpu, prefork.ncpu(), version("uname -sr")),
    floor(),
    "lua-prefork " .. prefork._VERSION .. ", " .. version(H.lua .. " -v"),
    table.concat({version("nginx -v"), "node " .. version("node -v"),
                  version("unicorn -v"), version("gunicorn --version"),
                  "POE " .. version("perl -MPOE -e 'print $POE::VERSION'"),
                  version("wrk -v")}, "; "),
  }
end

local function fmt (v)
  if v == nil then return "-" end
  if v >= 100 then return ("%.0f"):format(v) end
  if v >= 10 then return ("%.1f"):format(v) end
  return ("%.2f"):format(v)
end

local function report (done)
  local md = {"# lua-prefork benchmarks", "",
              "Written by `make bench` (bench/bench.lua) on " .. os.date("!%Y-%m-%d %H:%M UTC")
              .. (quick and " (quick run: 1 round, short runs)" or "") .. ".", ""}
  for _, l in ipairs(machine()) do md[#md + 1] = "- " .. l end
  md[#md + 1] = ""
  md[#md + 1] = "Each figure is the median of the samples; every peer ran in the same"
  md[#md + 1] = "run, alternating. The ratio column compares with the best peer that is"
  md[#md + 1] = "not lua-prefork (> 1 is better for lua-prefork where higher is better)."
  for _, r in ipairs(done) do
    local c = r.case
    md[#md + 1] = ""
    md[#md + 1] = "## " .. c.title
    md[#md + 1] = ""
    md[#md + 1] = ("| peer | median %s | samples | errors | ratio |"):format(c.unit)
    md[#md + 1] = "|---|---|---|---|---|"
    local best
    for name, s in pairs(r.samples) do
      local m = B.median(s)
      if not name:match("^lua%-prefork") and m then
        if not best or (c.better == "higher" and m > best) or (c.better == "lower" and m < best) then
          best = m
        end
      end
    end
    local names = {}
    for name in pairs(r.samples) do names[#names + 1] = name end
    table.sort(names, function (a, b)  -- best first; no figure last
      local ma, mb = B.median(r.samples[a]), B.median(r.samples[b])
      if ma == nil or mb == nil then return mb == nil and ma ~= nil end
      if c.better == "higher" then return ma > mb end
      return ma < mb
    end)
    for _, name in ipairs(names) do
      local s, m = r.samples[name], B.median(r.samples[name])
      local ratio = "-"
      if best and m and best ~= 0 and name:match("^lua%-prefork") then
        ratio = c.better == "higher" and ("%.2f ×"):format(m / best)
                or (m ~= 0 and ("%.2f ×"):format(best / m) or "∞ ×")
      end
      local ss = {}
      for i, v in ipairs(s) do ss[i] = fmt(v) end
      md[#md + 1] = ("| %s | %s | %s | %s | %s |"):format(name, fmt(m),
        table.concat(ss, " "), r.errors and tostring(r.errors[name] or 0) or "-", ratio)
    end
    local t = c.target
    if t then
      local ours = B.median(r.samples[t.who or "lua-prefork"] or {})
      local line
      if t.peer and ours and r.samples[t.peer] then
        local theirs = B.median(r.samples[t.peer])
        local ratio = ours / theirs
        line = ("Target: lua-prefork ≥ %.1f × %s. Measured: %.2f × → %s."):format(
          t.ratio, t.peer, ratio, ratio >= t.ratio and "met" or "**not met**")
      elseif t.min and ours then
        line = ("Target: ≥ %s %s. Measured: %s → %s."):format(fmt(t.min), c.unit, fmt(ours),
          ours >= t.min and "met" or "**not met**")
      elseif t.max and ours then
        line = ("Target: ≤ %s %s%s. Measured: %s → %s."):format(fmt(t.max), c.unit,
          t.who and " (" .. t.who .. ")" or "", fmt(ours), ours <= t.max and "met" or "**not met**")
      end
      if line then md[#md + 1] = "" md[#md + 1] = line end
    end
    if c.note then md[#md + 1] = "" md[#md + 1] = c.note end
  end
  H.writefile("bench/results.md", table.concat(md, "\n") .. "\n")
end


local function chart (done)
  local data = {}
  local rows = {}
  local ka, cl
  for _, r in ipairs(done) do
    if r.case.name == "http_keepalive" then ka = r.samples end
    if r.case.name == "http_close" then cl = r.samples end
  end
  if not ka and not cl then return end
  for _, peer in ipairs(B.http_peers) do
    local name = peer[1]
    if not peer.optin then
      rows[#rows + 1] = ('"%s" %.0f %.0f'):format(name,
        B.median((ka or {})[name] or {}) or 0, B.median((cl or {})[name] or {}) or 0)
    end
  end
  local dat = tmp .. "/http.dat"
  H.writefile(dat, table.concat(rows, "\n") .. "\n")
  data[#data + 1] = dat
  local gp = tmp .. "/chart.gp"
  H.writefile(gp, ([[
set terminal pngcairo size 900,500 font ",10"
set output "bench/results.png"
set title "HTTP hello, 2 workers, wrk -t2 -c50 (median req/s)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel "requests per second"
set yrange [0:*]
set grid ytics
set key top right
plot "%s" using 2:xtic(1) title "keep-alive", "" using 3 title "Connection: close"
]]):format(dat))
  H.sh("gnuplot " .. gp)
end

-- }======================================================


local done = {}
local t0 = H.now()
local ok, err = pcall(function ()
  for _, c in ipairs(B.cases) do
    if next(wanted) == nil or wanted[c.name] then
      B.say("case " .. c.name .. ": " .. c.title)
      local samples, errors = c.run(B)
      done[#done + 1] = {case = c, samples = samples, errors = errors}
      report(done)
    end
  end
end)
H.cleanup()
if ok then
  chart(done)
  report(done)
end
H.sh("rm -rf " .. tmp)
if not ok then
  B.say("bench failed: " .. tostring(err))
  os.exit(1)
end
B.say(("done in %.0f s: bench/results.md, bench/results.png"):format(H.now() - t0))
io.stdout:write(H.readfile("bench/results.md"))
