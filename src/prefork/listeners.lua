--- prefork.listeners: the listening sockets of a master. It binds the
-- addresses of `listen`, and adopts the sockets it inherits: from
-- systemd (LISTEN_FDS), Server::Starter (SERVER_STARTER_PORT), einhorn
-- (EINHORN_FD_COUNT, EINHORN_FDS), `fd:N` entries, and the master it
-- upgrades (PREFORK_FDS). The variables go from the environment.
--
-- An entry of `listen` that an inherited socket already holds adopts it
-- instead of binding again (the same address, or the same port where one
-- side is a wildcard). Without `listen` every inherited socket is served;
-- with it, the inherited ones no entry takes are served too (systemd
-- passed them for that), but those of an upgrade are closed (the new
-- code no longer listens there).

local core = require "prefork.core"

local M = {}


-- {======================================================
-- What the environment offers
-- =======================================================

local function take (name)
  local v = os.getenv(name)
  if v ~= nil then core.unsetenv(name) end
  return v
end


-- systemd's socket activation: fds 3.. for this pid, named
local function systemd (out)
  local pid, n = take("LISTEN_PID"), take("LISTEN_FDS")
  local names = take("LISTEN_FDNAMES")
  if tonumber(pid) ~= core.getpid() or not tonumber(n) then return end
  local list = {}
  for name in ((names or "") .. ":"):gmatch("([^:]*):") do list[#list + 1] = name end
  for i = 0, tonumber(n) - 1 do
    local name = list[i + 1] ~= "" and list[i + 1] or "unknown"
    out[#out + 1] = {fd = 3 + i, origin = "systemd:" .. name,
                     source = "systemd"}
  end
end


-- "addr=fd;addr=fd" (Server::Starter, and our own upgrade's PREFORK_FDS)
local function pairs_of (v, source, out)
  for origin, fd in (v or ""):gmatch("([^;]+)=(%d+)") do
    out[#out + 1] = {fd = tonumber(fd), origin = origin, source = source}
  end
end


-- einhorn: EINHORN_FD_COUNT and EINHORN_FD_0.., or the older EINHORN_FDS
local function einhorn (out)
  local n = tonumber(take("EINHORN_FD_COUNT"))
  for i = 0, (n or 0) - 1 do
    local fd = tonumber(take("EINHORN_FD_" .. i))
    if fd then out[#out + 1] = {fd = fd, origin = "einhorn:" .. i, source = "einhorn"} end
  end
  for fd in (take("EINHORN_FDS") or ""):gmatch("%d+") do
    out[#out + 1] = {fd = tonumber(fd), origin = "einhorn:" .. fd, source = "einhorn"}
  end
end


--- The sockets the environment offers: {fd, origin, source}, and the
-- fd where the master this one upgrades waits to hear it is ready.
function M.inherited ()
  local out = {}
  pairs_of(take("PREFORK_FDS"), "upgrade", out)
  systemd(out)
  pairs_of(take("SERVER_STARTER_PORT"), "server_starter", out)
  einhorn(out)
  return out, tonumber(take("PREFORK_UPGRADE_FD"))
end

-- }======================================================


-- {======================================================
-- Matching entries with inherited sockets
-- =======================================================

local function hostport (addr)
  local host, port = addr:match("^%[?(.-)%]?:(%d+)$")
  return host, tonumber(port)
end

local wild = {[""] = true, ["*"] = true, ["0.0.0.0"] = true, ["::"] = true}

-- does the inherited socket at address have the address of entry?
local function sameaddress (entry, address)
  entry = tostring(entry)
  if entry == address then return true end
  if entry:match("^unix:") or address:match("^unix:") then return false end
  if entry:match("^%d+$") then entry = "0.0.0.0:" .. entry end
  local h1, p1 = hostport(entry)
  local h2, p2 = hostport(address)
  return p1 ~= nil and p1 == p2 and p1 ~= 0 and (h1 == h2 or wild[h1] or wild[h2])
end


-- does entry ("fd:N", "systemd", "systemd:NAME", an address) take the
-- inherited socket a ({l, fd, origin, source, used})?
local function takes (entry, a)
  if a.used or (a.source == "upgrade" and a.origin == "status") then
    return false
  end
  if a.origin == entry then return true end
  if entry == "systemd" then return a.source == "systemd" end
  if entry:match("^systemd:") or entry:match("^fd:") then
    return entry == "fd:" .. a.fd
  end
  return sameaddress(entry, a.l:address())
end


-- the inherited sockets an entry takes (now used)
local function takenby (entry, adopted)
  local found = {}
  for _, a in ipairs(adopted) do
    if takes(entry, a) then
      a.used = true
      found[#found + 1] = a
    end
  end
  return found
end

-- }======================================================


-- {======================================================
-- Opening
-- =======================================================

-- adopt each inherited fd; raises with what an fd is instead
local function adoptall (inh)
  local adopted = {}
  for _, i in ipairs(inh) do
    local l, why = core.adopt(i.fd)
    if not l then
      for _, a in ipairs(adopted) do a.l:close() end
      error(("inherited fd %d (%s): %s"):format(i.fd, i.origin, why), 0)
    end
    l:own(i.source == "upgrade")  -- its Unix file is ours now, or not
    adopted[#adopted + 1] = {l = l, origin = i.origin, source = i.source, fd = i.fd}
  end
  return adopted
end


-- one entry of listen: its listeners (inherited, or bound) into ls
local function open1 (entry, adopted, ls, opts, log)
  local s = tostring(entry)
  local found = takenby(s, adopted)
  if #found == 0 and (s:match("^systemd") or s:match("^fd:")) then
    local fd = tonumber(s:match("^fd:(%d+)$"))
    if s:match("^fd:") and not fd then
      error(("bad address '%s' (fd:N, N an open file descriptor)"):format(s), 0)
    elseif not fd then
      error(("no socket from systemd for %q (LISTEN_FDS, LISTEN_FDNAMES)"):format(s), 0)
    end
    local got = adoptall{{fd = fd, origin = s, source = "fd"}}
    found = got
  end
  for _, a in ipairs(found) do
    ls[#ls + 1], ls.origin[#ls + 1] = a.l, s
    log(("listening on %s (inherited: %s)"):format(a.l:address(), a.origin))
  end
  if #found > 0 then return end
  local ok, l, err = pcall(core.listen, entry, opts.backlog, opts.accept == "reuseport")
  if not ok or not l then error(ok and err or l, 0) end
  ls[#ls + 1], ls.origin[#ls + 1] = l, s
end


--- The master's listeners for opts: a list, with .origin (each one's
-- entry), .status (the status endpoint's) and .upgradefd; raises (in
-- prefork.start's words) having closed what it opened.
function M.open (opts, log)
  local inh, upfd = M.inherited()
  local ls = {origin = {}, upgradefd = upfd}
  local ok, adopted = pcall(adoptall, inh)
  if not ok then error("prefork.start: " .. adopted, 0) end
  local entries = opts.listen
  if type(entries) ~= "table" then entries = {entries} end
  local done, err = pcall(function ()
    for i, e in ipairs(entries) do
      local ok1, why = pcall(open1, e, adopted, ls, opts, log)
      if not ok1 then error(("listen[%d] %q: %s"):format(i, tostring(e), why), 0) end
    end
    M.openstatus(opts, adopted, ls)
    M.leftover(opts, adopted, ls, log)
  end)
  if not done then
    M.close(ls)
    for _, a in ipairs(adopted) do a.l:close() end
    error("prefork.start: " .. err, 0)
  end
  return ls
end


-- the status endpoint: the one the master we upgrade had, or bound
function M.openstatus (opts, adopted, ls)
  if not opts.status then return end
  for _, a in ipairs(adopted) do
    if a.source == "upgrade" and a.origin == "status" and not a.used then
      a.used, ls.status = true, a.l
      return
    end
  end
  local ok, st, err = pcall(core.listen, opts.status)
  if not ok or not st then
    error(("status %q: %s"):format(opts.status, ok and err or st), 0)
  end
  ls.status = st
end


-- the inherited sockets no entry took: served (systemd and the like
-- passed them for that), or closed (an upgrade's)
function M.leftover (opts, adopted, ls, log)
  for _, a in ipairs(adopted) do
    if not a.used then
      if a.source == "upgrade" or (opts.listen and a.source == "fd") then
        a.l:close()
      else
        ls[#ls + 1], ls.origin[#ls + 1] = a.l, a.origin
        log(("listening on %s (inherited: %s%s)"):format(a.l:address(), a.origin,
            opts.listen and ", not in listen" or ""))
      end
    end
  end
end


function M.close (ls)
  for _, l in ipairs(ls) do l:close() end
  if ls.status then ls.status:close() end
end


--- PREFORK_FDS for a new master: "origin=fd;..." of the listening sockets
-- (the status endpoint's as "status"), and the fds to pass
function M.handover (ls)
  local parts, fds = {}, {}
  local function add (origin, l)
    local fd = core.dup(l:getfd())
    parts[#parts + 1] = origin .. "=" .. fd
    fds[#fds + 1] = fd
  end
  for i, l in ipairs(ls) do
    if l:getfd() >= 0 and not l:template() then add(ls.origin[i], l) end
  end
  if ls.status then add("status", ls.status) end
  return table.concat(parts, ";"), fds
end

-- }======================================================


return M
