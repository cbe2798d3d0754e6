--- prefork.pool: a load-balanced pool of worker processes for calls
-- (after AnyEvent::Fork::Pool). See the README, "Process pool".
--
-- The owner keeps a queue of calls and a channel per worker (frames of
-- src/pool.c); a call goes to the least-loaded worker with room (at most
-- `load` in flight each). Workers come from a template process forked
-- when the pool is made, after `require` and `eval`; each runs `init`,
-- then answers calls until its channel closes. Answers are read when
-- the owner waits: pool:wait(), pool:map(), pool:close(), a call
-- without callback (which yields inside worker:serve and blocks
-- elsewhere), or pool:poll().

local core = require "prefork.core"

local encode, decode, encodeargs = core.encode, core.decode, core.encodeargs
local encodelist, decodeinto, newlist = core.encodelist, core.decodeinto, core.newlist
local wait_fd, now = core.wait_fd, core.now
local pack, unpack = table.pack, table.unpack
local select, type, pcall, error = select, type, pcall, error

-- frame kinds
local CALL, OK, ERR, EVENT, RETIRE, FAIL, ERRV = 1, 2, 3, 4, 5, 6, 7
local CHUNK, CHUNKOK, ITEMERR = 8, 9, 10  -- a map's chunk, its results, an item's error
-- added to a call's kind: answers waiting go out before it runs (its
-- time limit counts from the answer before it)
local FLUSHFIRST = 32
-- the frames ch:recv decodes in place, with the built-in serialiser: the
-- answers the owner reads, the calls a worker reads
local OKMASK = 1 << OK
local CALLMASK = (1 << CALL) | (1 << (CALL + FLUSHFIRST))

local MAXMSG = core.pool_maxmsg

-- a worker's answers wait to go out with the next ones while at least
-- BATCH calls wait for it, FLUSHGAP seconds at most
local BATCH, FLUSHGAP = 8, 0.0001


-- {======================================================
-- Inside a worker
-- =======================================================

local inworker = nil  -- the worker's state: {ch, fd, retire, retired}

local function flushall (w)
  while true do
    local ok = w.ch:flush()
    if ok then return true end
    if ok == nil then core.exit(0) end  -- the owner is gone
    wait_fd(w.fd, "w")
  end
end


--- Resolve "a.b.f" to require("a.b").f, "f" to the global f.
local function resolve (name, what)
  if type(name) == "function" then return name end
  local mod, field = name:match("^(.*)%.([^.]+)$")
  local f
  if mod then f = require(mod)[field] else f = _G[name] end
  if type(f) ~= "function" then
    error(("prefork.pool: %s '%s' is not a function"):format(what, name), 0)
  end
  return f
end


--- An error value as a frame: ERR with a string, ERRV with another value
-- that can travel (error values go by the built-in serialiser).
local function errframe (err)
  if type(err) == "string" then return ERR, err end
  local ok, s = pcall(encode, err)
  if ok and #s <= MAXMSG then return ERRV, s end
  return ERR, ("an error value that cannot be sent (%s): %s"):format(
    ok and "too large" or tostring(s), tostring(err))
end


--- How a chunk of a map travels: enchunk(t, i, j [, max]) encodes t[i..k]
-- and returns it and k (j, or less where max bytes were reached);
-- dechunk(s, t, off) decodes into t[off + 1 ..] (t nil: a new list) and
-- returns the count and t. The built-in serialiser does each in one C
-- call; another one takes t[i..j].
local function chunkcodec (ser)
  if not ser then return encodelist, decodeinto end
  return function (t, i, j) return ser.encode(unpack(t, i, j)), j end,
    function (s, t, off)
      local r = pack(ser.decode(s))
      t = t or {}
      for k = 1, r.n do t[off + k] = r[k] end
      return r.n, t
    end
end


--- Run job(done) in a coroutine of its own (an async worker); after(true,
-- values) once done is called, or after(false, err) if it raised first.
local function spawnjob (job, after)
  core.go(function ()
    local called = false
    local function done (...)
      if called then error("done called twice", 2) end
      called = true
      after(true, ...)
    end
    local good, err = pcall(job, done)
    if good then return end
    if called then
      core.log("error", "pool worker: after done: " .. tostring(err))
    else
      called = true
      after(false, err)
    end
  end)
end


local function workermain (opts, fd)
  local ser = opts.serialiser
  local enc, dec = ser and ser.encode or encode, ser and ser.decode or decode
  local enchunk, dechunk = chunkcodec(ser)
  local w = {ch = assert(core.chan(fd)), fd = fd, enc = enc}
  inworker = w
  local ch = w.ch
  -- not the template's sequence, which every worker would share
  math.randomseed(core.getpid(), math.floor(now() * 1e9))
  local ok, fn = pcall(function ()
    if opts.init then resolve(opts.init, "init")() end
    return resolve(opts[1] or opts.run, "function")
  end)
  if not ok then
    ch:send(FAIL, 0, tostring(fn))
    ch:flush()
    core.exit(1)
  end

  local function retiring ()
    if w.retire and not w.retired then
      w.retired = true
      ch:send(RETIRE, 0)
    end
  end

  -- the results of call id, as the encoder's pcall gave them (eok, s), in
  -- a frame of kind
  local function results (kind, id, eok, s)
    if not eok then
      ch:send(ERR, id, "cannot send the results: " .. tostring(s))
    elseif #s > MAXMSG then
      ch:send(ERR, id, "results too large (" .. #s .. " bytes)")
    else
      ch:send(kind, id, s)
    end
    retiring()
  end

  local function answer (id, good, ...)
    if good then return results(OK, id, pcall(enc, ...)) end
    local kind, s = errframe((...))
    ch:send(kind, id, s)
    retiring()
  end

  -- a chunk's item k failed with err: said before the chunk's results
  local function itemfailed (id, k, err)
    local kind, s = errframe(err)
    ch:send(ITEMERR, id, encode(k, kind == ERRV and decode(s) or s))
  end

  -- a chunk's results res[1..n]
  local function chunkdone (id, res, n)
    results(CHUNKOK, id, pcall(enchunk, res, 1, n))
  end

  local handle
  if opts.async then
    handle = function (kind, id, data)
      if kind > FLUSHFIRST then kind = kind - FLUSHFIRST end  -- (flushed each)
      if kind == CALL then
        spawnjob(function (done) return fn(done, dec(data)) end,
                 function (...) answer(id, ...) flushall(w) end)
        return
      elseif kind ~= CHUNK then core.exit(3) end
      local n, items = dechunk(data, nil, 0)
      local res, left = newlist(n), n
      if n == 0 then chunkdone(id, res, 0) return end
      for k = 1, n do
        spawnjob(function (done) return fn(done, items[k]) end,
                 function (good, r)
                   if good then res[k] = r else itemfailed(id, k, r) end
                   left = left - 1
                   if left == 0 then chunkdone(id, res, n) flushall(w) end
                 end)
      end
    end
    core.run(function ()
      while true do
        wait_fd(fd, "r")
        if not ch:recv(handle) then core.exit(0) end
        flushall(w)
      end
    end)
  else
    local function run (data) return fn(dec(data)) end
    local items, res, from, to, cap = nil, nil, 1, 0, -1  -- kept for each chunk
    local flushed = now()  -- when answers last went out
    local function loop ()  -- from: the item running, when one raises
      for k = from, to do
        from = k
        res[k] = fn(items[k])
      end
    end
    handle = function (kind, id, data, ...)
      if kind > FLUSHFIRST then
        flushall(w)
        kind = kind - FLUSHFIRST
      end
      if kind == CALL then  -- data: the string, or (built-in) whether it decoded
        if ser then answer(id, pcall(run, data))
        elseif data then answer(id, pcall(fn, ...))
        else answer(id, false, (...)) end
      elseif kind == CHUNK then
        to, items = dechunk(data, items, 0)  -- (nil at first: a new list)
        if to > cap then res, cap = newlist(to), to end
        from = 1
        while true do
          local good, err = pcall(loop)
          if good then break end
          res[from] = nil
          itemfailed(id, from, err)
          from = from + 1
        end
        chunkdone(id, res, to)
      else
        core.exit(3)
      end
      -- answers go out at once (the next call may take long), but in one
      -- write for several when the owner keeps this worker busy (BATCH
      -- calls wait here), at most FLUSHGAP seconds late
      if not ch:buffered(BATCH) then
        flushall(w)
      else
        local t = now()
        if t - flushed >= FLUSHGAP then
          flushall(w)
          flushed = t
        end
      end
    end
    while true do
      if not ch:recv(handle, not ser and CALLMASK or 0) then break end
      flushall(w)
      flushed = now()
      wait_fd(fd, "r")
    end
  end
  core.exit(0)
end

-- }======================================================


-- {======================================================
-- The owner's side
-- =======================================================

local Pool = {}
Pool.__index = Pool

local function check (cond, msg, lvl)
  if not cond then error("prefork.pool: " .. msg, lvl or 3) end
end


--- The cause of a child's end, from its status.
local function cause (how, code)
  if how == "exit" then return "exit " .. code end
  if how == "signal" then
    return "killed by signal " .. code .. " (" .. (core.signame(code) or "?") .. ")"
  end
  return code or "no status"  -- why its status is not to be had
end


-- pids of processes let go (of forgotten pools, or never set up), reaped
-- without waiting on later turns of any pool
local letgo = {}

local function reapsome ()
  for i = #letgo, 1, -1 do
    local p, how = core.wait(letgo[i], "nohang")
    if p or how ~= "running" then table.remove(letgo, i) end
  end
end


local function fault (self, msg)
  local h = self.on_error
  if h then h(msg) else error("prefork.pool: " .. msg, 0) end
end


local function deliver (self, cb, good, ...)
  local ok, err = pcall(cb, good, ...)
  if not ok and not self.cberr then self.cberr = err end
end


--- The call id of w answered: out of w's books; the worker's next call
-- starts now.
local function answered (self, w, id)
  local calls, fifo = w.calls, w.fifo
  calls[id] = nil
  w.sent[id], w.tmo[id], w.kind[id] = nil, nil, nil
  local h = w.fh
  while h <= w.ft and calls[fifo[h]] == nil do fifo[h] = nil h = h + 1 end
  w.fh = h
  local n = w.inflight - 1
  w.inflight = n
  self.outstanding = self.outstanding - 1
  if n == 0 then w.idle = self.clock else w.hstart = self.clock end
end


local function settle (self, w, id, good, ...)
  local cb = w.calls[id]
  if cb == nil then
    w.corrupt = "corrupt message: an answer for no call"
    return
  end
  answered(self, w, id)
  deliver(self, cb, good, ...)
end


--- Take w out of the pool (its channel closed: it leaves on its own).
local function removeworker (self, w)
  if w.dead then return end
  w.dead = true
  for i, x in ipairs(self.procs) do
    if x == w then table.remove(self.procs, i) break end
  end
  self.byfd[w.fd] = nil
  if self.ep then self.ep:ctl("del", w.fd) end
  w.ch:close()
end


--- Take the call at the head of the queue q: data, cb, tmo, kind.
local function unqueue (q)
  local h = q.head
  local data, cb, tmo, kind = q.data[h], q.cb[h], q.tmo[h], q.kind[h]
  q.data[h], q.cb[h], q.t[h], q.tmo[h], q.kind[h], q.lim[h] = nil, nil, nil, nil, nil, nil
  q.head = h + 1
  return data, cb, tmo, kind
end


--- Fail every call that waits in the queue.
local function failqueue (self, msg)
  local q = self.queue
  while q.head <= q.tail do
    local _, cb = unqueue(q)
    self.outstanding = self.outstanding - 1
    deliver(self, cb, false, msg)
  end
end


--- Put a call back at the head of the queue.
local function pushfront (self, data, cb, tmo, kind)
  local q = self.queue
  local h = q.head - 1
  q.head = h
  q.data[h], q.cb[h], q.t[h], q.tmo[h], q.kind[h] = data, cb, 0, tmo, kind
end


--- w is gone: its calls leave its books. The one it was running (the
-- first, unless `idle`) fails with msg, as does every call of an async
-- worker (they all ran); the calls a sync worker had not started go back
-- to the queue, in their order.
local function unwind (self, w, msg, idle)
  local calls, fifo = w.calls, w.fifo
  for i = w.ft, w.fh, -1 do
    local id = fifo[i]
    local cb = calls[id]
    if cb then
      calls[id] = nil
      w.inflight = w.inflight - 1
      self.outstanding = self.outstanding - 1
      if (i == w.fh and not idle) or w.async then
        deliver(self, cb, false, msg)
      else
        self.outstanding = self.outstanding + 1  -- queued again
        pushfront(self, w.sent[id], cb, w.tmo[id], w.kind[id])
      end
    end
  end
  w.fh, w.ft, w.fifo = 1, 0, {}
end


--- A worker's channel ended (it died, or broke the protocol): the call
-- it ran fails with the cause. Never yields: the bookkeeping stays whole.
local function lost (self, w, why, idle)
  if w.dead then return end
  removeworker(self, w)
  local how, code = core.pool_reap(w.pid, 1)
  if w.inflight > 0 then
    unwind(self, w, ("pool worker %d died during the call (%s)"):format(
      w.pid, why or cause(how, code)), idle)
  end
end


--- Kill w and what it started (its process group).
local function killworker (w)
  core.kill(-w.pid, "KILL")
  core.kill(w.pid, "KILL")
end


--- The time w's running call must end by (math.huge: no limit); for an
-- async worker, the first of its calls' limits.
local function deadline (w)
  if w.inflight == 0 then return math.huge end
  if not w.async then
    local tmo = w.tmo[w.fifo[w.fh]]
    return tmo and w.hstart + tmo or math.huge
  end
  local due = math.huge
  for id, t in pairs(w.tmo) do due = math.min(due, w.dl[id] + t) end
  return due
end


--- Kill the workers whose call ran past its timeout: that call fails,
-- the calls queued behind it go to other workers.
local function expire (self)
  local t = now()
  for i = #self.procs, 1, -1 do
    local w = self.procs[i]
    if deadline(w) <= t then
      local id = w.fifo[w.fh]
      if w.async then  -- the call past its limit
        for k, tmo in pairs(w.tmo) do
          if w.dl[k] + tmo <= t then id = k break end
        end
      end
      local cb, tmo = w.calls[id], w.tmo[id]
      killworker(w)
      answered(self, w, id)
      lost(self, w, "killed: a call beside it timed out", true)
      deliver(self, cb, false, ("timeout after %g s"):format(tmo))
    end
  end
end


--- Stop an idle or retired worker: its channel closes, it exits at
-- once (reaped here, without yielding; KILL if it lingers past 1 s).
local function stopworker (self, w)
  removeworker(self, w)
  core.pool_reap(w.pid, 1)
end


-- an answer's values decoded by a custom serialiser and handed to its
-- callback, in one pcall; `decoding` tells a decoder's error from the
-- callback's
local decoding = false
local function decoded (...) decoding = false return ... end
local function okcall (cb, dec, data) decoding = true return cb(true, decoded(dec(data))) end

local function okcustom (self, cb, data)
  local good, err = pcall(okcall, cb, self.decode, data)
  if not good then
    if decoding then
      decoding = false
      deliver(self, cb, false, err)
    elseif not self.cberr then
      self.cberr = err
    end
  end
end


--- The function that takes w's frames (ch:recv calls it for each; an
-- answer comes decoded with the built-in serialiser: data tells whether
-- it decoded, the values or why not follow).
local function framer (self, w)
  local calls = w.calls
  return function (kind, id, data, ...)
    if kind == OK then
      local cb = calls[id]
      if cb == nil then
        w.corrupt = "corrupt message: an answer for no call"
        return
      end
      answered(self, w, id)
      if self.serialiser then okcustom(self, cb, data)
      elseif data then deliver(self, cb, true, ...)
      else deliver(self, cb, false, (...)) end
    elseif kind == ERR then
      settle(self, w, id, false, data)
    elseif kind == ERRV then
      local _, err = pcall(decode, data)  -- the value, or why not
      settle(self, w, id, false, err)
    elseif kind == CHUNKOK then
      settle(self, w, id, true, data)  -- decoded by the map, in place
    elseif kind == ITEMERR then  -- the chunk's results follow
      if calls[id] then deliver(self, calls[id], nil, data)
      else w.corrupt = "corrupt message: an answer for no call" end
    elseif kind == EVENT then
      local good, err = pcall(function ()
        if self.on_event then self.on_event(self.decode(data)) end
      end)
      if not good and not self.cberr then self.cberr = err end
    elseif kind == RETIRE then
      w.retiring = true
    elseif kind == FAIL then
      w.failed = data
    else
      w.corrupt = "corrupt message: frame kind " .. kind
    end
  end
end


--- Read what w sent and act on how its channel is: true while it lives.
local function take (self, w)
  local ok, err = w.ch:recv(w.onframe, not self.serialiser and OKMASK or 0)
  if w.dead then return false end
  if w.failed then
    lost(self, w, "init failed: " .. w.failed)
    if not self.failed then  -- nothing can serve what waits
      self.failed = w.failed
      failqueue(self, "pool worker init failed: " .. w.failed)
      self.fault = "worker init failed: " .. w.failed
    end
  elseif w.corrupt then
    lost(self, w, w.corrupt)
    self.fault = w.corrupt
  elseif not ok then
    lost(self, w, err ~= "closed" and err or nil)
    if err ~= "closed" then self.fault = err end
  end
  return not w.dead
end


local function spawn (self)
  local fd, pid = core.pool_spawn(self.ctl)
  if not fd then return nil, pid end
  local ch, err = core.chan(fd)
  if not ch then
    core.close(fd)
    letgo[#letgo + 1] = pid
    return nil, err
  end
  local w = {pid = pid, fd = fd, ch = ch, inflight = 0, calls = {},
             idle = now(), async = self.async,
             fifo = {}, fh = 1, ft = 0,  -- call ids in the order sent
             sent = {}, tmo = {}, dl = {}, kind = {}, hstart = 0}
  w.onframe = framer(self, w)
  self.ep:ctl("add", fd, "r")
  self.byfd[fd] = w
  self.procs[#self.procs + 1] = w
  return w
end


local function flush (self, w)
  local ok = w.ch:flush()
  if ok == nil then  -- it is gone: read what it answered first
    if take(self, w) then lost(self, w) end
    return
  end
  if ok == not w.wantw then return end
  w.wantw = not ok  -- watch writability while the socket is full
  self.ep:ctl("mod", w.fd, ok and "r" or "rw")
end


-- a worker whose running call has run longer than this (seconds) gets no
-- new call while another has room: fast calls do not queue behind a slow one
local LAG = 0.0002

--- The worker for the next call at time t: the least loaded with room
-- (fewer than load calls in flight),
-- passing over those whose running call lags; and the best of those: the
-- least late (by powers of two), then the least loaded.
local function pick (self, t, load)
  local best, lagging, late = nil, nil, math.huge
  local workers = self.procs
  for i = 1, #workers do
    local w = workers[i]
    local n = w.inflight
    if n < load and not w.retiring then
      if n > 0 and t - w.hstart > LAG then
        local l = math.floor(math.log(t - w.hstart, 2))
        if l < late or (l == late and n < lagging.inflight) then
          lagging, late = w, l
        end
      elseif best == nil or n < best.inflight
             or (n == best.inflight and w.hstart > best.hstart) then
        best = w  -- of two as loaded, the one whose call started later
      end
    end
  end
  return best, lagging
end


--- Send the call at the head of the queue to w.
local function sendone (self, w, t)
  local data, cb, tmo, kind = unqueue(self.queue)
  local id = self.nextid
  self.nextid = id < 0x7fffffff and id + 1 or 1
  w.ch:send((kind or CALL) + (tmo and FLUSHFIRST or 0), id, data)
  w.calls[id] = cb
  if kind then w.kind[id] = kind end
  local ft = w.ft + 1
  w.ft, w.fifo[ft], w.sent[id] = ft, id, data
  if tmo then
    w.tmo[id] = tmo
    if w.async then w.dl[id] = t end
  end
  if w.inflight == 0 then w.hstart = t end
  w.inflight = w.inflight + 1
  w.idle = nil
end


--- Retired workers go once they answered; idle ones by the knobs; at
-- least min run. The error of a failed start, if any.
local function trim (self, spawnerr)
  local workers, t, nidle = self.procs, now(), 0
  for i = #workers, 1, -1 do
    local w = workers[i]
    if w.retiring and w.inflight == 0 then
      stopworker(self, w)
    elseif w.idle then
      nidle = nidle + 1
    end
  end
  for i = #workers, 1, -1 do
    local w = workers[i]
    if #workers <= self.min then break end
    if w and w.idle and (nidle > self.max_idle or t - w.idle >= self.idle_time) then
      stopworker(self, w)
      nidle = nidle - 1
    end
  end
  while #workers < self.min and not self.failed and not self.closing
        and not spawnerr do
    local _, err = spawn(self)
    spawnerr = err
  end
  return spawnerr
end


--- Send queued calls to workers with room (one write each); start
-- workers as needed; stop idle ones beyond the knobs. Faults are raised
-- at the end, with everything sent.
local function dispatch (self)
  local q, workers = self.queue, self.procs
  local dirty, spawnerr, t = nil, nil, now()
  self.clock = t
  while q.head <= q.tail do
    if q.data[q.head] == false then  -- a chunk of a map let go
      unqueue(q)
      self.outstanding = self.outstanding - 1
      goto continue
    end
    local m = q.lim[q.head]  -- (a map's chunk)
    local best, lagging = pick(self, t, m and m.lim or self.load)
    if (best == nil or best.inflight > 0) and #workers < self.max
       and not self.failed and not spawnerr
       and (self.busy_time <= 0 or t - q.t[q.head] >= self.busy_time) then
      local w, err = spawn(self)
      best = w or best
      spawnerr = err
    end
    best = best or lagging
    if best == nil then break end
    sendone(self, best, t)
    if best ~= dirty then
      if dirty then flush(self, dirty) end
      dirty = best
    end
    ::continue::
  end
  if dirty then flush(self, dirty) end
  spawnerr = trim(self, spawnerr)
  if spawnerr then
    if #workers == 0 then  -- nothing will serve what waits
      failqueue(self, spawnerr)
      if spawnerr:match("gone") or spawnerr:match("pipe") then
        self.broken = spawnerr
      end
    end
    self.fault = self.fault or spawnerr
  end
end


--- The next time something is due: an idle worker's end, or a new
-- worker for a call waiting beyond busy_time.
local function nextdue (self)
  local due = math.huge
  if #self.procs > self.min then
    for _, w in ipairs(self.procs) do
      if w.idle then due = math.min(due, w.idle + self.idle_time) end
    end
  end
  local q = self.queue
  if q.head <= q.tail and self.busy_time > 0 and #self.procs < self.max
     and not self.failed then
    due = math.min(due, q.t[q.head] + self.busy_time)
  end
  if self.timed then
    for _, w in ipairs(self.procs) do due = math.min(due, deadline(w)) end
  end
  return due
end


--- Raise what went wrong in this turn: a pool fault (to on_error) or a
-- callback's error.
local function raise (self)
  local f = self.fault
  if f then
    self.fault = nil
    fault(self, f)
  end
  local err = self.cberr
  if err then
    self.cberr = nil
    error(err, 0)
  end
end


--- One turn: wait until a channel is ready (at most timeout seconds; nil:
-- until something is due), read every answer there, send what is queued.
local function pump (self, timeout)
  reapsome()
  local left = nextdue(self) - now()
  if timeout and timeout < left then left = timeout end
  if left > 0 then
    for _, w in ipairs(self.procs) do  -- answers read already, not handed over
      if w.ch:buffered() then left = 0 break end
    end
    if #self.procs == 0 and self.queue.head > self.queue.tail then left = 0 end
  end
  local ready = pack(self.ep:wait(left > 0 and (left ~= math.huge and left or -1) or 0))
  self.clock = now()  -- the time of this turn's answers
  for i = 1, ready.n do
    local w = self.byfd[ready[i]]
    if w then
      if w.wantw then flush(self, w) end
      if not w.dead then take(self, w) end
    end
  end
  for _, w in ipairs(self.procs) do
    if w.ch:buffered() then take(self, w) end
  end
  if self.timed then expire(self) end
  dispatch(self)
  raise(self)
end


local function enqueue (self, data, cb, tmo, kind, lim)
  if type(data) ~= "string" then
    return cb(false, "the serialiser's encode returned a " .. type(data))
  end
  if #data > MAXMSG then
    return cb(false, "message too large (" .. #data .. " bytes; the limit is "
              .. MAXMSG .. ")")
  end
  if self.broken then return cb(false, self.broken) end
  local q = self.queue
  local waiting = q.head <= q.tail
  local t = q.tail + 1
  q.tail = t
  q.data[t], q.cb[t], q.t[t] = data, cb, self.busy_time > 0 and now() or 0
  if tmo then q.tmo[t], self.timed = tmo, true end
  if kind then q.kind[t], q.lim[t] = kind, lim end
  self.outstanding = self.outstanding + 1
  if self.failed then self.failed = nil end  -- try again with new calls
  -- with calls waiting already, no worker has room: the next turn sends
  if not waiting then
    dispatch(self)
    raise(self)
  end
end


--- pool:call(args..., cb) queues; pool:call(args...) awaits the answer:
-- ok, results... or false, message. (opts: the call's options, or nil)
local function call (self, opts, ...)
  check(not self.closing, "attempt to use a closed pool", 4)
  local tmo = opts and opts.timeout or self.timeout
  local n = select("#", ...)
  local cb = n > 0 and select(n, ...) or nil
  if type(cb) == "function" then
    local good, data
    if self.encode == encode then good, data = pcall(encodeargs, ...)
    else
      local args = pack(...)
      good, data = pcall(self.encode, unpack(args, 1, n - 1))
    end
    if not good then return cb(false, tostring(data)) end
    return enqueue(self, data, cb, tmo)
  end
  local good, data = pcall(self.encode, ...)
  if not good then return false, tostring(data) end
  local co = coroutine.running()
  local r
  enqueue(self, data, function (...)
    r = pack(...)
    -- read by another coroutine's turn: wake this one
    if coroutine.running() ~= co and self.ep then self.ep:kick() end
  end, tmo)
  self.waiting = self.waiting + 1
  local ok, err = pcall(function () while not r do pump(self) end end)
  self.waiting = self.waiting - 1
  if not ok then error(err, 0) end
  return unpack(r, 1, r.n)
end

function Pool:call (...) return call(self, nil, ...) end


local function checktimeout (t, lvl)
  check(t == nil or (type(t) == "number" and t > 0),
        "timeout must be a number > 0 (got " .. tostring(t) .. ")", lvl or 4)
end


--- pool:with{timeout = s}: the pool, its calls with these options:
-- pool:with(opts):call(...), :map(list), :imap(list).
local View = {}
View.__index = View

function Pool:with (opts)
  check(not self.closing, "attempt to use a closed pool")
  check(type(opts) == "table", "with: a table of options expected")
  for k in pairs(opts) do
    check(k == "timeout", "with: unknown option '" .. tostring(k) .. "'")
  end
  checktimeout(opts.timeout)
  return setmetatable({pool = self, opts = opts}, View)
end

function View:call (...) return call(self.pool, self.opts, ...) end


--- Run the loop until every queued call has answered.
function Pool:wait ()
  while self.outstanding > 0 do pump(self) end
  return true
end


--- One turn of the loop, waiting at most timeout seconds (0: none):
-- answers that came are handed to their callbacks. Returns the number
-- of calls not answered yet.
function Pool:poll (timeout)
  check(not self.closing, "attempt to use a closed pool")
  pump(self, timeout or 0)
  return self.outstanding
end


-- {------------------------------------------------------
-- map and imap: a list in chunks, several items per message each way
-- -------------------------------------------------------

--- The items per chunk when none is asked for: about four chunks for
-- each worker that can run at once (Python's rule).
local function autochunk (self, n)
  local workers = math.max(1, math.min(self.max, core.ncpu()))
  return math.max(1, -(-n // (4 * workers)))
end


local mapopts = {chunksize = true, ordered = true, timeout = true}

-- bytes of a chunk, about, at most, when the chunk size is automatic: a
-- chunk stays in the caches, and the workers start sooner
local CHUNKBYTES = 256 * 1024

local function checkmapopts (opts, what)
  check(opts == nil or type(opts) == "table", what .. ": options must be a table", 4)
  for k in pairs(opts or {}) do
    check(mapopts[k], what .. ": unknown option '" .. tostring(k) .. "'", 4)
  end
  local size = opts and opts.chunksize
  check(size == nil or (math.type(size) == "integer" and size >= 1),
        what .. ": chunksize must be an integer >= 1", 4)
  checktimeout(opts and opts.timeout, 4)
end


--- The callback of the chunk list[i..j] of the map m.
local function chunkcb (m, i, j)
  return function (ok, data)
    if m.cancelled then return end
    if ok == nil then  -- an item failed; the chunk's results follow
      local k, err = decode(data)
      m.failed[i - 1 + k], m.err[i - 1 + k] = true, err
      return
    end
    if ok then
      local good, err = pcall(m.dechunk, data, m.res, i - 1)
      if not good then ok, data = false, err end
    end
    if not ok then
      if j > i then data = ("%s (a chunk of items %d..%d)"):format(data, i, j) end
      for k = i, j do m.failed[k], m.err[k] = true, data end
    end
    m.left = m.left - (j - i + 1)
    m.ends[i] = j
    local r = m.ready
    r[#r + 1] = i
  end
end


--- Queue a chunk of m from list[i] to list[j] at most (max bytes at
-- most, when given); the index of its last item.
local function sendchunk (self, m, list, i, j, max)
  local good, data, last = pcall(m.enchunk, list, i, j, max)
  if good and (type(data) ~= "string" or #data > MAXMSG) and i < j then
    good = false  -- too large: one item a message
  end
  if not good and i < j then  -- which item cannot go? each on its own
    for k = i, j do sendchunk(self, m, list, k, k) end
    return j
  end
  j = good and last or j
  local cb = chunkcb(m, i, j)
  if not good then cb(false, tostring(data)) return j end
  local tmo = m.timeout and m.timeout * (j - i + 1)
  -- a worker holds this chunk only beside fewer than m.lim others: the
  -- rest wait here for whichever worker is free first
  enqueue(self, data, cb, tmo, CHUNK, m)
  local q = self.queue
  if q.cb[q.tail] == cb then m.queued[q.tail] = cb end
  return j
end


--- The chunks of a map of n items a worker may hold at once, when the
-- first chunk has k items: `load`, but a quarter of the map's share of
-- each worker at most (one slowed down leaves the rest to the others),
-- and two at least (the next at hand while the owner sends more).
local function maplimit (self, n, k)
  local chunks = -(-n // math.max(k, 1))
  local workers = math.max(1, math.min(self.max, core.ncpu()))
  return math.max(2, math.min(self.load, chunks // (4 * workers)))
end


--- Start a map of list: its chunks queued.
local function startmap (self, list, opts, what)
  check(not self.closing, "attempt to use a closed pool", 4)
  check(type(list) == "table", what .. ": a list expected", 4)
  checkmapopts(opts, what)
  opts = opts or {}
  local n = #list
  local size = opts.chunksize or autochunk(self, n)
  local enchunk, dechunk = chunkcodec(self.serialiser)
  local m = {n = n, left = n, res = newlist(n), failed = {}, err = {}, ends = {},
             ready = {}, rh = 1, queued = {}, enchunk = enchunk,
             dechunk = dechunk, timeout = opts.timeout or self.timeout,
             ordered = opts.ordered ~= false}
  local max = not opts.chunksize and CHUNKBYTES or nil
  m.lim = 2
  local i = 1
  while i <= n do
    local j = sendchunk(self, m, list, i, math.min(n, i + size - 1), max)
    if i == 1 then m.lim = maplimit(self, n, j) end
    i = j + 1
  end
  return m
end


--- A map let go before its end: its chunks still queued are not sent.
local function cancel (self, m)
  if m.left == 0 or m.cancelled then return end
  m.cancelled = true
  local q = self.queue
  for h, cb in pairs(m.queued) do
    if h >= q.head and q.cb[h] == cb then q.data[h] = false end
  end
end


--- list in, list of first results out, in order (chunked: several items
-- a message); raises on the first item that failed, in the list's order
-- (after every item answered): "item K: message" for a string error,
-- the error value itself otherwise.
function Pool:map (list, opts)
  local m = startmap(self, list, opts, "map")
  while m.left > 0 do pump(self) end
  local failed = m.failed
  if next(failed) then
    for k = 1, m.n do
      if failed[k] then
        local err = m.err[k]
        if type(err) == "string" then error(("item %d: %s"):format(k, err), 2) end
        error(err, 2)
      end
    end
  end
  return m.res
end


--- for i, ok, value in pool:imap(list [, opts]): the items' results as
-- they come, in the list's order (ordered = false: in the order they
-- come); ok false: value is the item's error. Leaving the loop early
-- drops the chunks not sent yet.
function Pool:imap (list, opts)
  local m = startmap(self, list, opts, "imap")
  local pos, last = 0, 0  -- the item given last, the end of its chunk
  local function step ()
    if pos < last then
      pos = pos + 1
    else
      local i
      if m.ordered then
        i = pos + 1
        if i > m.n then return nil end
        while not m.ends[i] do pump(self) end
      else
        if m.rh > #m.ready and m.left == 0 then return nil end
        while m.rh > #m.ready do pump(self) end
        i = m.ready[m.rh]
        m.rh = m.rh + 1
      end
      pos, last = i, m.ends[i]
    end
    if m.failed[pos] then return pos, false, m.err[pos] end
    return pos, true, m.res[pos]
  end
  local closer = setmetatable({}, {__close = function () cancel(self, m) end})
  return step, nil, nil, closer
end

--- The view's options, then opts over them.
local function viewopts (self, opts)
  local o = {timeout = self.opts.timeout}
  for k, v in pairs(opts or {}) do o[k] = v end
  return o
end

function View:map (list, opts) return self.pool:map(list, viewopts(self, opts)) end
function View:imap (list, opts) return self.pool:imap(list, viewopts(self, opts)) end

-- }------------------------------------------------------


--- The pool's workers: a list of {pid =, inflight =}.
function Pool:workers ()
  local t = {}
  for i, w in ipairs(self.procs) do
    t[i] = {pid = w.pid, inflight = w.inflight}
  end
  return t
end


--- Let every process go: close the template's control socket and the
-- channels (they exit on their own); returns their pids.
local function teardown (self)
  local pids = {}
  if self.ctl then
    core.close(self.ctl)
    self.ctl = nil
    pids[1] = self.tpid
  end
  for i = #self.procs, 1, -1 do
    local w = self.procs[i]
    w.dead = true
    w.ch:close()
    pids[#pids + 1] = w.pid
    self.procs[i] = nil
  end
  self.byfd = {}
  if self.ep then self.ep:close() self.ep = nil end
  return pids
end


--- Fail every call still unanswered (msg), killing the workers busy
-- with one.
local function cutoff (self, msg)
  for i = #self.procs, 1, -1 do
    local w = self.procs[i]
    if w.inflight > 0 then
      killworker(w)
      removeworker(self, w)
      core.pool_reap(w.pid, 1)
      w.async = true  -- none of its calls goes back to the queue
      unwind(self, w, msg)
    end
  end
  failqueue(self, msg)
end


--- No new calls; wait for the queued ones (at most timeout seconds: then
-- they fail and their workers are killed), let the processes go, then
-- on_destroy. Blocks (yields inside worker:serve). true, or nil and
-- what was cut off.
function Pool:close (timeout)
  if self.closed then return true end
  checktimeout(timeout, 3)
  self.closing = true
  local limit = timeout and now() + timeout or math.huge
  while self.outstanding > 0 and now() < limit do
    pump(self, limit - now())
  end
  local cut = self.outstanding
  if cut > 0 then
    cutoff(self, ("pool closed: no answer after %g s"):format(timeout))
  end
  while self.waiting > 0 do  -- awaiting coroutines see their answers first
    self.ep:kick()
    pump(self, 0.01)
  end
  self.closed = true
  for _, pid in ipairs(teardown(self)) do core.pool_reap(pid, 2) end
  if self.on_destroy then self.on_destroy() end
  if cut > 0 then return nil, ("%d calls cut off after %g s"):format(cut, timeout) end
  return true
end


Pool.__close = Pool.close
Pool.__gc = function (self)  -- forgotten: the processes see EOF and go
  if not self.closed then
    self.closed, self.closing = true, true
    for _, pid in ipairs(teardown(self)) do letgo[#letgo + 1] = pid end
  end
end

-- }======================================================


-- {======================================================
-- Making a pool
-- =======================================================

local knobs = {min = 0, max = 8, busy_time = 0, max_idle = 1, idle_time = 1,
               load = 32}

local function new (opts)
  check(type(opts) == "table", "a table of options expected")
  local fn = opts[1] or opts.run
  check(type(fn) == "string" or type(fn) == "function",
        "the function (opts[1] or run) must be a function or a name")
  for k, v in pairs(opts) do
    if knobs[k] then
      check(type(v) == "number" and v >= 0,
            k .. " must be a number >= 0 (got " .. tostring(v) .. ")")
    elseif not (k == 1 or k == "run" or k == "require" or k == "eval"
                or k == "init" or k == "async" or k == "serialiser"
                or k == "on_error" or k == "on_event" or k == "on_destroy"
                or k == "timeout") then
      check(false, "unknown option '" .. tostring(k) .. "'")
    end
  end
  for _, k in ipairs{"on_error", "on_event", "on_destroy"} do
    check(opts[k] == nil or type(opts[k]) == "function", k .. " must be a function")
  end
  check(opts.require == nil or type(opts.require) == "table",
        "require must be a list of module names")
  check(opts.eval == nil or type(opts.eval) == "string", "eval must be a string")
  checktimeout(opts.timeout)
  check(opts.init == nil or type(opts.init) == "string"
        or type(opts.init) == "function", "init must be a function or a name")
  local ser = opts.serialiser
  check(ser == nil or (type(ser) == "table" and type(ser.encode) == "function"
        and type(ser.decode) == "function"),
        "serialiser must be {encode = function, decode = function}")
  local self = setmetatable({
    queue = {head = 1, tail = 0, data = {}, cb = {}, t = {}, tmo = {}, kind = {},
             lim = {}},  -- lim: a chunk's map
    procs = {}, async = opts.async and true or false, timeout = opts.timeout,
    timed = opts.timeout ~= nil,
    byfd = {}, nextid = 1, outstanding = 0, waiting = 0, clock = now(),
    encode = ser and ser.encode or encode, decode = ser and ser.decode or decode,
    on_error = opts.on_error, on_event = opts.on_event,
    on_destroy = opts.on_destroy, serialiser = ser,
  }, Pool)
  for k, v in pairs(knobs) do self[k] = opts[k] or v end
  check(self.max >= 1, "max must be at least 1 (got " .. tostring(self.max) .. ")")
  check(self.load >= 1, "load must be at least 1")
  check(self.min <= self.max, "min must not exceed max")
  local wopts = {opts[1] or opts.run, init = opts.init, async = opts.async,
                 serialiser = ser}
  local function setup ()
    for _, m in ipairs(opts.require or {}) do require(m) end
    if opts.eval then assert(load(opts.eval, "=pool eval"))() end
  end
  local tpid, ctl = core.pool_template(setup, function (fd)
    core.settitle("prefork: pool worker")
    workermain(wopts, fd)
  end)
  if not tpid then
    local msg = "template: " .. tostring(ctl)
    if opts.on_error then opts.on_error(msg) end
    error("prefork.pool: " .. msg, 2)
  end
  self.tpid, self.ctl = tpid, ctl
  self.ep = assert(core.epoll())
  reapsome()
  dispatch(self)
  raise(self)
  return self
end


--- In a pool worker: on_event(...) runs in the owner.
local function event (...)
  local w = inworker
  if not w then error("prefork.pool.event: not in a pool worker", 2) end
  w.ch:send(EVENT, 0, w.enc(...))
  flushall(w)
end


--- In a pool worker: end after the current call.
local function retire ()
  local w = inworker
  if not w then error("prefork.pool.retire: not in a pool worker", 2) end
  w.retire = true
end

-- }======================================================


return setmetatable({new = new, event = event, retire = retire,
                     maxmsg = MAXMSG},
                    {__call = function (_, opts) return new(opts) end})
