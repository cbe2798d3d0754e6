--- prefork.status: the pages of a master's status endpoint (the `status`
-- option): GET / is master:stats() as JSON, GET /metrics the same in
-- Prometheus' text format.

local status = {}


-- {======================================================
-- JSON
-- =======================================================

local escapes = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b',
                 ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}

local function jsonstring (s)
  return '"' .. s:gsub('[%c"\\]', function (c)
    return escapes[c] or ("\\u%04x"):format(c:byte())
  end) .. '"'
end


local function isarray (t)
  local n = #t
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
  end
  return n > 0 or next(t) == nil
end


--- JSON of v: tables (lists or string-keyed objects, keys sorted),
-- strings, numbers (non-finite ones as null), booleans
local function json (v)
  local t = type(v)
  if t == "table" then
    local out = {}
    if isarray(v) then
      for i, x in ipairs(v) do out[i] = json(x) end
      return "[" .. table.concat(out, ",") .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for i, k in ipairs(keys) do
      local x = v[k]
      if x == nil then x = v[tonumber(k)] end
      out[i] = jsonstring(k) .. ":" .. json(x)
    end
    return "{" .. table.concat(out, ",") .. "}"
  elseif t == "string" then
    return jsonstring(v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    return math.type(v) == "integer" and tostring(v) or ("%.14g"):format(v)
  elseif t == "boolean" then
    return tostring(v)
  end
  return "null"
end
status.json = json

-- }======================================================


-- {======================================================
-- Prometheus text
-- =======================================================

local function metric (out, name, kind, help, samples)
  out[#out + 1] = ("# HELP %s %s"):format(name, help)
  out[#out + 1] = ("# TYPE %s %s"):format(name, kind)
  for _, s in ipairs(samples) do
    out[#out + 1] = s[1] and ("%s{%s} %s"):format(name, s[1], s[2])
                  or ("%s %s"):format(name, s[2])
  end
end


local function label (k, v)
  return ('%s="%s"'):format(k, tostring(v):gsub('[\\"\n]', {
    ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n"}))
end


--- the Prometheus text of st (master:stats())
local function prometheus (st)
  local out = {}
  local states = {starting = 0, running = 0, stopping = 0}
  local req, rss, inflight, beat = {}, {}, {}, {}
  for _, w in ipairs(st.workers) do
    states[w.state] = states[w.state] + 1
    local id = label("id", w.id)
    req[#req + 1] = {id, w.requests}
    inflight[#inflight + 1] = {id, w.inflight}
    if w.rss then rss[#rss + 1] = {id, w.rss} end
    if w.beat then beat[#beat + 1] = {id, ("%.3f"):format(w.beat)} end
  end
  metric(out, "prefork_workers", "gauge", "Workers of the master, by state.", {
    {label("state", "starting"), states.starting},
    {label("state", "running"), states.running},
    {label("state", "stopping"), states.stopping}})
  metric(out, "prefork_standby", "gauge",
         "Standby workers forked ahead (the standby option).",
         {{nil, #(st.standby or {})}})
  metric(out, "prefork_requests_total", "counter",
         "Requests served: connections, and what worker:count added.",
         {{nil, st.requests}})
  metric(out, "prefork_respawns_total", "counter",
         "Workers respawned after they exited.", {{nil, st.respawns}})
  metric(out, "prefork_timeouts_total", "counter",
         "Workers killed for going without a heartbeat (timeout, boot_timeout).",
         {{nil, st.timeouts}})
  metric(out, "prefork_recycled_total", "counter",
         "Workers recycled (max_requests, max_memory).", {{nil, st.recycled}})
  metric(out, "prefork_reloads_total", "counter",
         "Reloads (HUP, master:reload).", {{nil, st.reloads}})
  metric(out, "prefork_upgrades_total", "counter",
         "Upgrades (USR2).", {{nil, st.upgrades}})
  metric(out, "prefork_uptime_seconds", "gauge",
         "Seconds since the master started.",
         {{nil, ("%.3f"):format(st.uptime)}})
  metric(out, "prefork_worker_requests_total", "counter",
         "Requests served by the current process of each worker id.", req)
  metric(out, "prefork_worker_inflight", "gauge",
         "Connections each worker holds.", inflight)
  metric(out, "prefork_worker_rss_bytes", "gauge",
         "Resident memory of each worker.", rss)
  metric(out, "prefork_worker_heartbeat_age_seconds", "gauge",
         "Seconds since each worker's last heartbeat.", beat)
  return table.concat(out, "\n") .. "\n"
end
status.prometheus = prometheus

-- }======================================================


--- The page for method and path: code, content type, body.
function status.page (master, method, path)
  if method ~= "GET" and method ~= "HEAD" then
    return 405, "text/plain", "only GET\n"
  end
  path = path:match("^[^?]*")
  if path == "/" then
    return 200, "application/json", json(master:stats()) .. "\n"
  elseif path == "/metrics" then
    return 200, "text/plain; version=0.0.4", prometheus(master:stats())
  end
  return 404, "text/plain", "not found: try / or /metrics\n"
end


return status
