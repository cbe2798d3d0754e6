--- prefork.socket: LuaSocket 3.x's client surface over prefork's
-- connections, so that libraries written for LuaSocket run inside
-- worker:serve without blocking the worker: connect, send and receive
-- yield there (they block elsewhere, as LuaSocket's do).
--
--   socket.http.request{url = ..., create = prefork.socket.tcp}
--   redis.connect{socket = prefork.socket.connect(host, port)}
--
-- The objects answer as LuaSocket's do: receive gives data, or nil, err,
-- partial; send the index of the last byte sent, or nil, err, index; the
-- error words are LuaSocket's ("closed", "timeout", "connection
-- refused", ...). docs/interop.md lists what differs.

local core = require "prefork.core"

local CONN = debug.getregistry()["prefork.conn"]  -- conn.c's metatable

local M = {_VERSION = "prefork.socket (LuaSocket 3.0 client surface)"}

local servers = {}  -- the objects of server()
local tcp = {}  -- the methods
tcp.__index = tcp
tcp.__name = "prefork.socket.tcp"


-- {======================================================
-- Errors as LuaSocket words them
-- =======================================================

-- errno -> LuaSocket's message (its pierror.h); others: strerror
local words = {
  [98] = "address already in use", [106] = "already connected",
  [13] = "permission denied", [111] = "connection refused",
  [103] = "closed", [104] = "closed", [32] = "closed", [110] = "timeout",
}

-- getaddrinfo's codes (negative) -> LuaSocket's messages
local gaiwords = {
  [-3] = "temporary failure in name resolution",
  [-4] = "non-recoverable failure in name resolution",
  [-6] = "ai_family not supported", [-10] = "memory allocation failure",
  [-2] = "host or service not provided, or not known",
  [-5] = "host or service not provided, or not known",  -- EAI_NODATA
  [-8] = "service not supported for socket type",
}

-- prefork's failure (why, errno) as LuaSocket's error string
local function word (why, en)
  if why == "closed" or why == "timeout" then return why end
  if type(why) == "string" and why:match("^getaddrinfo: ") then
    return gaiwords[en] or why:sub(14):lower()
  end
  return words[en] or (type(why) == "string" and why:gsub("^%w+: ", ""))
         or tostring(why)
end

M.word = word  -- (for the specs)

-- }======================================================


-- {======================================================
-- Objects
-- =======================================================

local function check (self, name)
  if getmetatable(self) ~= tcp then
    error(("bad argument #1 to '%s' (prefork.socket.tcp expected, got %s)")
          :format(name, type(self)), 3)
  end
  return self
end


local function new (family, conn)
  return setmetatable({family = family, conn = conn, block = nil,
                       total = nil}, tcp)
end


--- tcp(), tcp4(), tcp6(): an unconnected object (a "master" in
-- LuaSocket's words) whose connect opens a prefork connection.
function M.tcp () return new(nil) end
function M.tcp4 () return new("tcp4") end
function M.tcp6 () return new("tcp6") end


--- wrap(conn): a connected object over a prefork connection (it owns it
-- from now on).
function M.wrap (conn)
  if getmetatable(conn) ~= CONN then
    error("bad argument #1 to 'wrap' (prefork.conn expected, got "
          .. type(conn) .. ")", 2)
  end
  return new(nil, conn)
end


-- the connection's timeout: the smaller of the block and total ones
local function timeout (self)
  local b, t = self.block, self.total
  if b and t then return math.min(b, t) end
  return b or t
end


--- tcp:settimeout(value [, mode]): mode "b" (each wait, the default) or
-- "t" (the whole call); nil or negative: none. Both bound each call as
-- a whole here (the smaller one counts). Returns 1.
function tcp:settimeout (value, mode)
  check(self, "settimeout")
  if value ~= nil and type(value) ~= "number" then
    error("bad argument #1 to 'settimeout' (number expected, got "
          .. type(value) .. ")", 2)
  end
  if value and value < 0 then value = nil end
  mode = mode or "b"
  if mode == "b" or mode == "r" then self.block = value
  elseif mode == "t" then self.total = value
  else error("bad argument #2 to 'settimeout' (invalid timeout mode '"
             .. tostring(mode) .. "')", 2)
  end
  if self.conn then self.conn:settimeout(timeout(self)) end
  return 1
end


function tcp:gettimeout ()
  check(self, "gettimeout")
  return self.block or -1, self.total or -1
end


--- tcp:connect(host, port) -> 1 | nil, err
function tcp:connect (host, port)
  check(self, "connect")
  if type(host) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(host)
          .. ")", 2)
  end
  if math.type(tonumber(port)) ~= "integer" then
    error("bad argument #2 to 'connect' (a port number expected, got "
          .. tostring(port) .. ")", 2)
  end
  if self.conn then return nil, "already connected" end
  local addr = (host:find(":", 1, true) and "[" .. host .. "]" or host)
               .. ":" .. tostring(tonumber(port))
  local c, why, en = core.connect(addr, timeout(self), self.family)
  if not c then return nil, word(why, en) end
  self.conn = c
  return 1
end


-- the bytes buffered in the connection (what a timeout left)
local function taken (c)
  local n = c:pending()
  return n > 0 and c:read(n) or ""
end


-- the failure of a receive: nil, err, partial (what a timeout left in
-- the buffer is taken, as LuaSocket gives it; a line's without its CRs)
local function rfailed (c, prefix, why, en, line)
  local got = ""
  if why ~= "closed" and c:getfd() >= 0 then got = taken(c) end
  if line then got = got:gsub("\r", "") end
  return nil, word(why, en), prefix .. got
end


local function receiveline (c, prefix)
  local line, why, en = c:read("L")
  if not line then return rfailed(c, prefix, why, en, true) end
  local stripped = line:gsub("\r", "")
  if line:sub(-1) ~= "\n" then  -- the last bytes, without a newline
    return nil, "closed", prefix .. stripped
  end
  return prefix .. stripped:sub(1, -2)
end


local function receiveall (c, prefix)
  local all, why, en = c:read("a")
  if not all then return rfailed(c, prefix, why, en) end
  if all == "" then return nil, "closed", prefix end  -- nothing new came
  return prefix .. all
end


local function receiven (c, n, prefix)
  if n <= #prefix then return prefix end  -- (LuaSocket's, as it is)
  local got, why, en = c:read(n - #prefix)
  if not got then return rfailed(c, prefix, why, en) end
  if #got < n - #prefix then return nil, "closed", prefix .. got end
  return prefix .. got
end


--- tcp:receive([pattern [, prefix]]) -> data | nil, err, partial
-- pattern: "*l" or "l" (a line, its CRs dropped), "*a" or "a" (to end of
-- stream), a number of bytes (counting the prefix's).
function tcp:receive (pattern, prefix)
  check(self, "receive")
  prefix = prefix or ""
  if type(prefix) ~= "string" then
    error("bad argument #2 to 'receive' (string expected, got "
          .. type(prefix) .. ")", 2)
  end
  local c = self.conn
  if c == nil then
    error("receive: the socket is not connected", 2)
  end
  pattern = pattern or "*l"
  if c:getfd() < 0 then return nil, "closed", prefix end
  if type(pattern) == "number" then
    if pattern < 0 then
      error("bad argument #1 to 'receive' (invalid receive pattern)", 2)
    end
    return receiven(c, math.floor(pattern), prefix)
  elseif pattern == "*l" or pattern == "l" then
    return receiveline(c, prefix)
  elseif pattern == "*a" or pattern == "a" then
    return receiveall(c, prefix)
  end
  error("bad argument #1 to 'receive' (invalid receive pattern)", 2)
end


--- tcp:send(data [, i [, j]]) -> last index sent | nil, err, last index
function tcp:send (data, i, j)
  check(self, "send")
  if type(data) ~= "string" and type(data) ~= "number" then
    error("bad argument #1 to 'send' (string expected, got " .. type(data)
          .. ")", 2)
  end
  local c = self.conn
  if c == nil then error("send: the socket is not connected", 2) end
  data = tostring(data)
  local size = #data
  i, j = math.floor(i or 1), math.floor(j or -1)
  if i < 0 then i = size + i + 1 end
  if j < 0 then j = size + j + 1 end
  if i < 1 then i = 1 end
  if j > size then j = size end
  if c:getfd() < 0 then return nil, "closed", i - 1 end
  if i > j then return i - 1 end
  local ok, why, en, sent = c:write(data:sub(i, j))
  if ok then return j end
  return nil, word(why, en), i - 1 + (sent or 0)
end


--- tcp:close() -> 1 (twice is fine)
function tcp:close ()
  check(self, "close")
  if self.conn then self.conn:close() end
  return 1
end


--- tcp:shutdown([mode]) -> 1 | nil, err; mode "both", "send", "receive"
function tcp:shutdown (mode)
  check(self, "shutdown")
  if not self.conn or self.conn:getfd() < 0 then return nil, "closed" end
  local ok, why, en = core.shutdown(self.conn, mode or "both")
  if not ok then return nil, word(why, en) end
  return 1
end


--- tcp:getfd() -> the fd, or -1 (unconnected or closed)
function tcp:getfd ()
  check(self, "getfd")
  return self.conn and self.conn:getfd() or -1
end


--- tcp:dirty() -> whether bytes wait in the buffer (socket.select)
function tcp:dirty ()
  check(self, "dirty")
  local c = self.conn
  return c ~= nil and c:getfd() >= 0 and c:pending() > 0
end


local options = {["tcp-nodelay"] = true, keepalive = true, reuseaddr = true,
                 reuseport = true}

--- tcp:setoption(name, value) -> 1 | nil, err: "tcp-nodelay",
-- "keepalive", "reuseaddr", "reuseport"; other names raise
function tcp:setoption (name, value)
  check(self, "setoption")
  if not options[name] then
    error(("bad argument #1 to 'setoption' (unsupported option '%s': "
          .. "tcp-nodelay, keepalive, reuseaddr or reuseport)")
          :format(tostring(name)), 2)
  end
  if type(value) ~= "boolean" then
    error("bad argument #2 to 'setoption' (boolean 'on' expected)", 2)
  end
  if not self.conn or self.conn:getfd() < 0 then return nil, "closed" end
  local ok, why, en = core.sockopt(self.conn, name, value)
  if not ok then return nil, word(why, en) end
  return 1
end


function tcp:getoption (name)
  check(self, "getoption")
  if not options[name] then
    error(("bad argument #1 to 'getoption' (unsupported option '%s')")
          :format(tostring(name)), 2)
  end
  if not self.conn or self.conn:getfd() < 0 then return nil, "closed" end
  local v, why, en = core.sockopt(self.conn, name)
  if v == nil then return nil, word(why, en) end
  return v
end


local function name (self, peer)
  if not self.conn or self.conn:getfd() < 0 then return nil, "closed" end
  local host, port, family = core.sockname(self.conn, peer)
  if not host then return nil, word(port, family) end
  return host, port, family
end

--- tcp:getpeername() -> ip, port, family ("inet", "inet6") | nil, err
function tcp:getpeername () check(self, "getpeername") return name(self, true) end

--- tcp:getsockname() -> ip, port, family | nil, err
function tcp:getsockname () check(self, "getsockname") return name(self, false) end


--- tcp:getfamily() -> "inet" or "inet6" of a connected socket
function tcp:getfamily ()
  check(self, "getfamily")
  local _, _, family = name(self, false)
  return family or (self.family == "tcp6" and "inet6" or "inet")
end


function tcp:__tostring ()
  local c = self.conn
  if not c then return "prefork.socket.tcp{master}" end
  if c:getfd() < 0 then return "prefork.socket.tcp{closed}" end
  return ("prefork.socket.tcp{client}: fd %d"):format(c:getfd())
end

-- }======================================================


-- {======================================================
-- Extras
-- =======================================================

--- connect(host, port [, timeout]) -> a connected object | nil, err
function M.connect (host, port, t)
  if type(host) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(host)
          .. ")", 2)
  end
  local s = M.tcp()
  if t then s:settimeout(t) end
  local ok, err = s:connect(host, port)
  if not ok then return nil, err end
  return s
end


--- dup(sock) -> a new fd of the same socket (close-on-exec): for a
-- library that takes over an fd (cqueues.socket.fdopen), whose close
-- must not close the worker's own | nil, err, errno
function M.dup (sock)
  local fd = sock
  if math.type(sock) ~= "integer" then
    local ok, f = pcall(function () return sock:getfd() end)
    fd = ok and math.tointeger(f) or nil  -- (LuaSocket's: a float)
  end
  if math.type(fd) ~= "integer" or fd < 0 then
    error("bad argument #1 to 'dup' (an fd or an open socket expected, got "
          .. tostring(sock) .. ")", 2)
  end
  return core.dup(fd)
end


--- server(listener [, backlog]) -> a LuaSocket server object (socket.tcp's)
-- on a worker's listener (worker.listeners[i]), for LuaSocket's own accept
-- loop. The listener must listen in this process: the templates of
-- accept = "reuseport" and the listeners of accept = "master" (closed in
-- a worker) are refused. listen(2) is called again with backlog (default
-- 1024, as prefork's own). The object owns the listener's fd: closing it
-- closes the worker's listener. A graceful stop makes its accept fail.
function M.server (listener, backlog)
  local fd = type(listener) == "number" and listener
             or (type(listener) == "userdata" or type(listener) == "table")
                and listener.getfd and listener:getfd()
  if math.type(fd) ~= "integer" then
    error("bad argument #1 to 'server' (a listener or an fd expected, got "
          .. type(listener) .. ")", 2)
  end
  if backlog ~= nil and math.type(backlog) ~= "integer" then
    error("bad argument #2 to 'server' (integer expected, got "
          .. type(backlog) .. ")", 2)
  end
  if fd < 0 or not core.sockopt(fd, "acceptconn") then
    error("bad argument #1 to 'server' (not listening in this process: "
          .. "a closed listener, a reuseport template or accept = \"master\")",
          2)
  end
  local socket = require "socket"
  local s = socket.tcp()
  s:close()  -- (its own fd, if it made one)
  s:setfd(fd)
  local ok, err = s:listen(backlog or 1024)
  if not ok then return nil, err end
  servers[#servers + 1] = s  -- never collected: its __gc would close the
  return s                   -- listener's fd behind the listener's back
end

-- }======================================================

return M
