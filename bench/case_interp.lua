-- bench/case_interp.lua: the prefork-interp case of bench/bench.lua, which loads every
-- bench/case_*.lua with B (its helpers and B.quick) and registers what
-- it declares with B.case.

local B = ...
local H = B.H
local prefork = require "prefork"
local quick = B.quick

-- The interp case: a script with 200 ms of initialisation and 30 MB of
-- resident data, called warm. Targets (design.md section 4): a warm call
-- at most 1.5 x /bin/true in the same run, and at least 5 x faster than
-- Debian's prefork-interp with its Perl library. Its scripts live in a
-- directory of their own (the wrapper's ident covers the cwd), and their
-- servers are killed by pid at the end.
local INTERP_LUA = [[
local interp = require "prefork.interp"
local prefork = require "prefork"
local data = {}  -- 30 MB resident, as the server's RSS shows
for i = 1, 100000 do data[i] = {i, tostring(i), ("x"):rep(40) .. i} end
prefork.sleep(0.2)
interp.initialisation_complete{}
io.stdout:write("ok\n")
]]
local TARGET_TRUE, TARGET_PERL = 1.5, 5

local HEAVY_PL = [[
#!/usr/bin/prefork-interp -U,perl
use strict; use warnings;
use POSIX; use Data::Dumper; use List::Util; use Storable; use File::Spec;
use Getopt::Long; use Time::HiRes; use Encode; use Proc::Prefork::Interp;
Time::HiRes::sleep(0.2);
prefork_initialisation_complete();
print "ok\n"; STDOUT->flush(); POSIX::_exit(0);
]]

--- hyperfine -N of one command in dir: its median in ms
local function hyperfine (dir, cmd, runs)
  local json = dir .. "/hf.json"
  H.sh(("cd %s && hyperfine -N --warmup 20 --runs %d --export-json %s '%s' >/dev/null 2>&1")
       :format(dir, runs, json, cmd))
  local j = H.readfile(json) or ""
  local times = {}
  for n in (j:match('"times"%s*:%s*(%b[])') or ""):gmatch("[%d.eE+-]+") do
    times[#times + 1] = tonumber(n) * 1000
  end
  os.remove(json)
  return B.median(times)
end

--- the resident size (MB) of the server whose cwd is dir
local function serverrss (dir)
  for pid, cwd in H.sh("ls -l /proc/[0-9]*/cwd 2>/dev/null"):gmatch("/proc/(%d+)/cwd %-> ([^\n]+)") do
    if cwd == dir and H.cmdline(pid):match("%[server%]") then return B.rssmb(pid) end
  end
end

--- kill (by pid) every process whose cwd is under base: the servers,
-- the Perl monitors, the wrapper's watchers
local function killunder (base)
  local pids = {}
  for pid, cwd in H.sh("ls -l /proc/[0-9]*/cwd 2>/dev/null"):gmatch("/proc/(%d+)/cwd %-> ([^\n]+)") do
    if cwd:sub(1, #base) == base then pids[#pids + 1] = tonumber(pid) end
  end
  for _, pid in ipairs(pids) do H.kill(pid, "KILL") end
  for _, pid in ipairs(pids) do prefork.wait(pid, "nohang") end
end

B.case{name = "interp", title = "interp: warm call of a script with 200 ms of initialisation and 30 MB resident (hyperfine -N, median)",
  unit = "ms", better = "lower",
  run = function ()
    local c = B.cases[#B.cases]
    for _, k in ipairs(B.cases) do if k.name == "interp" then c = k end end
    local base = H.sh("mktemp -d /tmp/bench_interp.XXXXXX"):match("%S+")
    local client = io.open("build/lua-prefork") and (H.sh("pwd"):match("%S+") .. "/build/lua-prefork")
    local peers = {
      {"lua-prefork (Debian prefork-interp)", "lua", "/usr/bin/prefork-interp -U,lua5.4 heavy.lua"},
      client and {"lua-prefork (build/lua-prefork)", "luac", client .. " heavy.lua"} or false,
      {"Debian prefork-interp + Perl", "perl", "/usr/bin/prefork-interp -U,perl heavy.pl"},
      {"floor: /bin/true", "true", "/bin/true"},
    }
    local samples = {}
    for _, p in ipairs(peers) do
      if p then
        local dir = base .. "/" .. p[2]
        H.sh("mkdir -p " .. dir)
        H.writefile(dir .. "/heavy.lua", INTERP_LUA)
        H.writefile(dir .. "/heavy.pl", HEAVY_PL)
        H.sh("chmod +x " .. dir .. "/heavy.pl")
        H.sh(("cd %s && %s >/dev/null 2>&1"):format(dir, p[3]))  -- start the server (cold)
      end
    end
    for r = 1, B.rounds do
      for _, p in ipairs(peers) do
        if p then
          local m = hyperfine(base .. "/" .. p[2], p[3], quick and 50 or 200)
          samples[p[1]] = samples[p[1]] or {}
          table.insert(samples[p[1]], m)
          B.say(("  round %d %-36s %s ms"):format(r, p[1], m and ("%.2f"):format(m) or "failed"))
        end
      end
    end
    local rss = serverrss(base .. "/lua")
    local cold = hyperfine(base .. "/lua", "lua5.4 heavy.lua", quick and 3 or 5)
    killunder(base)
    H.sh(("cd %s/lua && /usr/bin/prefork-interp --kill,-U,lua5.4 heavy.lua; cd %s/perl && /usr/bin/prefork-interp --kill,-U,perl heavy.pl")
         :format(base, base))
    if client then H.sh(("cd %s/luac && %s --kill heavy.lua"):format(base, client)) end
    H.sh("rm -rf " .. base)
    local floor = B.median(samples["floor: /bin/true"] or {})
    local perl = B.median(samples["Debian prefork-interp + Perl"] or {})
    local lines = {("Cold (`lua5.4 heavy.lua`, init-complete a no-op): %s ms; the server's RSS %s MB."):format(
      cold and ("%.1f"):format(cold) or "?", rss and ("%.0f"):format(rss) or "?")}
    for _, name in ipairs{"lua-prefork (Debian prefork-interp)", "lua-prefork (build/lua-prefork)"} do
      local m = B.median(samples[name] or {})
      if m and floor and perl then
        lines[#lines + 1] = ("%s: %.2f × /bin/true (target ≤ %g: %s), %.2f × faster than Debian+Perl (target ≥ %g: %s).")
          :format(name, m / floor, TARGET_TRUE, m / floor <= TARGET_TRUE and "met" or "**not met**",
                  perl / m, TARGET_PERL, perl / m >= TARGET_PERL and "met" or "**not met**")
      elseif name:match("build") and not client then
        lines[#lines + 1] = name .. ": skipped (no build/lua-prefork in this checkout)."
      end
    end
    c.note = table.concat(lines, " ") .. " Commands: hyperfine -N --warmup 20 --runs 200 "
      .. "'/usr/bin/prefork-interp -U,lua5.4 heavy.lua' (and -U,perl heavy.pl, build/lua-prefork heavy.lua, /bin/true), "
      .. "each from a directory of its own, servers started before; heavy.pl as in the reference (§9), ending with POSIX::_exit(0)."
    for _, l in ipairs(lines) do B.say("  " .. l) end
    return samples
  end}

