-- tools/metrics.lua: sizes of the C sources, for the limits the README's
-- "Architecture" section sets (files under 800 lines; functions: median
-- at most 12 lines, none over 80).
--   lua5.4 tools/metrics.lua [FILE...]   (default: src/*.c lua-prefork/*.c)
-- A function is counted from its first line to its closing brace at
-- column 0; prototypes and macros are not functions.

local files = {...}
if #files == 0 then
  local p = io.popen("ls src/*.c lua-prefork/*.c fuzz/*.c 2>/dev/null")
  for f in p:lines() do files[#files + 1] = f end
  p:close()
end

local funcs, problems = {}, {}
for _, path in ipairs(files) do
  local n, start, name = 0, nil, nil
  local cand, body = nil, false  -- a signature's first line; inside a body
  for line in io.lines(path) do
    n = n + 1
    if not body and line:match("^[%a_]") and line:match("%(")
       and not line:match("^typedef") and not line:match("=") then
      cand, name = n, line:match("([%w_]+)%s*%(")
    end
    if cand and not body and line:match(";%s*$") then cand = nil end
    if cand and not body and line:match("{%s*$") then
      body, start = true, cand
    elseif body and line:match("^}") then
      body, cand = false, nil
      funcs[#funcs + 1] = {path = path, name = name, first = start, len = n - start + 1}
      start = nil
    end
  end
  if n >= 800 then problems[#problems + 1] = ("%s: %d lines (limit 800)"):format(path, n) end
end

local lens = {}
for i, f in ipairs(funcs) do lens[i] = f.len end
table.sort(lens)
local median = #lens > 0 and (#lens % 2 == 1 and lens[(#lens + 1) // 2]
               or (lens[#lens // 2] + lens[#lens // 2 + 1]) / 2) or 0
table.sort(funcs, function (a, b) return a.len > b.len end)
for _, f in ipairs(funcs) do
  if f.len > 80 then
    problems[#problems + 1] = ("%s:%d: %s is %d lines (limit 80)"):format(
      f.path, f.first, f.name, f.len)
  end
end
print(("%d functions in %d files; median %s lines, longest %s (%s, %d lines)"):format(
  #funcs, #files, median, funcs[1] and funcs[1].name or "-",
  funcs[1] and funcs[1].path or "-", funcs[1] and funcs[1].len or 0))
if median > 12 then problems[#problems + 1] = ("median %s lines (limit 12)"):format(median) end
for _, p in ipairs(problems) do print(p) end
os.exit(#problems == 0)
