-- examples/http_request.lua: the HTTP/1.x request reader of
-- examples/http.lua, apart so that it can be fuzzed (fuzz/http_request.c).
-- read_request(conn) never raises on any input: it returns the request
-- or nil and a reason ("closed", "timeout", "bad request line", ...).

local MAXHEADERS = 100
local MAXLINE = 8192  -- longest request or header line, as nginx's default

-- v without the spaces and tabs at its ends, in linear time
local function trim (v)
  local i, j = 1, #v
  while i <= j and (v:byte(i) == 32 or v:byte(i) == 9) do i = i + 1 end
  while j >= i and (v:byte(j) == 32 or v:byte(j) == 9) do j = j - 1 end
  return v:sub(i, j)
end

--- Read one request: {method, target, version, names = {...}, headers =
-- {lowercase name = value}} or nil, reason.
local function read_request (conn)
  conn:setmaxline(MAXLINE)
  local line, err = conn:read("l")
  if not line then return nil, err end
  local method, target, version =
    line:match("^(%u+) (%S+) HTTP/(1%.[01])\r?$")
  if not method then return nil, "bad request line" end
  local req = {method = method, target = target, version = version,
               names = {}, headers = {}}
  for _ = 1, MAXHEADERS do
    local h, herr = conn:read("l")
    if not h then return nil, herr end
    if h:byte(-1) == 13 then h = h:sub(1, -2) end
    if h == "" then return req end
    local name, value = h:match("^([!#$%%&'*+%-.^_`|~%w]+):(.*)$")
    if not name then return nil, "bad header line" end
    value = trim(value)
    req.names[#req.names + 1] = name
    local key = name:lower()
    req.headers[key] = req.headers[key] and (req.headers[key] .. ", " .. value)
                       or value
  end
  return nil, "too many headers"
end


return read_request
