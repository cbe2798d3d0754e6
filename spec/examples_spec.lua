-- Every example runs from the checkout and does what its header says.

local lu = require "luaunit"
local H = require "helpers"
local socket = require "socket"

--- Start an example with args; wait for its address line.
local function example (name, args, pattern)
  local p = H.spawn(H.lua .. " examples/" .. name .. " " .. (args or ""))
  p.port = tonumber(p:expect(pattern or "127%.0%.0%.1:(%d+)"))
  return p
end

TestExamples = {}

function TestExamples:tearDown () H.cleanup() end

function TestExamples:test_echo ()
  local p = example("echo.lua", "0")
  local kids = H.nworkers(p, 8)
  local reply = H.request_ok(p.port, "me\nhi there\n")
  local pid, msg = reply:match("^Hello me, this is PID (%d+)\n(.*)$")
  lu.assertEquals(msg, "hi there\n")
  local found = false
  for _, k in ipairs(kids) do found = found or k == tonumber(pid) end
  lu.assertTrue(found)
  p:kill("TERM")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end

function TestExamples:test_http_with_curl_and_wrk ()
  local p = H.spawn("env WORKERS=2 " .. H.lua .. " examples/http.lua 0")
  p.port = tonumber(p:expect("http://127%.0%.0%.1:(%d+)/"))
  local url = "http://127.0.0.1:" .. p.port .. "/some/path"
  local page = H.sh("curl -s -i -H 'X-Test: <yes>' " .. url)
  lu.assertStrContains(page, "HTTP/1.1 200 OK\r\n")
  lu.assertStrContains(page, "Connection: keep-alive\r\n")
  -- persistent: curl reuses the connection for a second URL
  local two = H.sh("curl -sv " .. url .. " " .. url .. " 2>&1 >/dev/null")
  lu.assertStrContains(two, "Re-using existing connection")
  -- "Connection: close" and HTTP/1.0 are honoured
  lu.assertStrContains(H.sh("curl -si -H 'Connection: close' " .. url),
                       "Connection: close\r\n")
  lu.assertStrContains(H.sh("curl -si --http1.0 " .. url), "Connection: close\r\n")
  -- pipelined requests are answered in order, then the close is honoured
  local both = H.request(p.port, "GET /1 HTTP/1.1\r\nX-N: 1\r\n\r\n"
                         .. "GET /2 HTTP/1.1\r\nX-N: 2\r\nConnection: close\r\n\r\n")
  local n1, n2 = both:find("<td>X-N</td><td>1</td>", 1, true),
                 both:find("<td>X-N</td><td>2</td>", 1, true)
  lu.assertTrue(n1 and n2 and n1 < n2, both)
  lu.assertStrContains(page, "<tr><td>X-Test</td><td>&lt;yes&gt;</td></tr>")
  lu.assertStrMatches(page, ".*<tr><td>PID</td><td>%d+</td></tr>.*")
  lu.assertStrMatches(page, ".*<tr><td>time</td><td>%a+ %a+ %d+ [%d:]+ %d+ GMT</td></tr>.*")
  local bad = H.request(p.port, "NONSENSE\r\n\r\n")
  lu.assertStrContains(bad, "HTTP/1.1 400 Bad Request\r\n")
  bad = H.request(p.port, "GET / HTTP/1.1\r\nno colon here\r\n\r\n")
  lu.assertStrContains(bad, "400 Bad Request")
  local post = H.sh("curl -s -d 'a=1' " .. url)
  lu.assertStrContains(post, "<td>Content-Length</td><td>3</td>")
  for _, mode in ipairs{"", "-H 'Connection: close'"} do  -- keep-alive, close
    local w = H.sh("wrk -t2 -c20 -d1s " .. mode .. " " .. url .. " 2>&1")
    lu.assertStrMatches(w, ".*Requests/sec:%s+[%d.]+.*")
    lu.assertNotStrContains(w, "Non-2xx")
    lu.assertNotStrContains(w, "Socket errors")
  end
  p:kill("TERM")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end

function TestExamples:test_relaunch_replaces_the_changed_worker_on_hup ()
  local conf = H.tmpname()
  H.writefile(conf, 'workers = 2\ngreeting = "Hello"\n')
  local p = example("relaunch.lua", "0 " .. conf)
  -- the workers say who they are when they come up
  local function up ()
    local t = {}
    for id, pid, g in p:out():gmatch('worker (%d+) up: pid (%d+), greeting "(%a+)"') do
      t[#t + 1] = {id = tonumber(id), pid = tonumber(pid), greeting = g}
    end
    return t
  end
  local first = H.wait_until(function ()
    local t = up()
    return #t == 2 and t
  end, 5, "both workers")
  local pid1 = first[1].id == 1 and first[1].pid or first[2].pid
  local pid2 = first[1].id == 2 and first[1].pid or first[2].pid
  lu.assertStrMatches(H.request_ok(p.port), "Hello from worker %d %(pid %d+%)\n")
  H.writefile(conf, 'workers = 2\ngreeting = "Hello"\ngreetings = {[2] = "Bonjour"}\n')
  p:kill("HUP")
  p:expect("reloaded")
  local new = H.wait_until(function ()
    local t = up()
    return #t == 3 and t[3]
  end, 5, "the new worker 2")
  lu.assertEquals({new.id, new.greeting}, {2, "Bonjour"})
  H.wait_until(function ()
    local kids = H.childpids(p.pid)
    return #kids == 2 and (kids[1] == pid1 or kids[2] == pid1)
       and kids[1] ~= pid2 and kids[2] ~= pid2
  end, 5, "worker 1 kept, the old worker 2 gone")
  p:kill("TERM")
  lu.assertEquals({p:wait(5)}, {"exit", 0})
end

function TestExamples:test_pool ()
  local p = H.spawn(H.lua .. " examples/pool.lua")
  lu.assertEquals({p:wait(20)}, {"exit", 0})
  local out, seen = p:out(), {}
  for n, sq in out:gmatch("returned\ttrue\tdoit (%d+) in %d+\t(%d+)\n") do
    lu.assertEquals(tonumber(sq), tonumber(n) ^ 2 // 1)
    seen[#seen + 1] = tonumber(n)
  end
  table.sort(seen)
  lu.assertEquals(seen, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10})
  lu.assertStrContains(out, "destroyed\ttrue\n")
  lu.assertEquals(H.childpids(p.pid), {})
end

--- the README's way: build/lua-prefork examples/interp.lua ARGS, from a
-- directory of the test's own (the server's identity includes the cwd)
function TestExamples:test_interp_through_the_wrapper_and_standalone ()
  local root = H.sh("pwd"):match("[^\n]+")
  local dir = H.sh("mktemp -d /tmp/lpexample.XXXXXX"):match("[^\n]+")
  local client = os.getenv("LUA_PREFORK_CLIENT") or root .. "/build/lua-prefork"
  -- (under the sanitizers, the lua5.4 it starts needs their runtime)
  local preload = H.lua:match("^env (LD_PRELOAD=%S+) ")
  client = (preload and "env " .. preload .. " " or "") .. client
  local run = ("cd %s && %s %s/examples/interp.lua "):format(dir, client, root)
  local one = H.sh(run .. "a b")
  local pid1, server1 = one:match("hello from pid (%d+) %(server (%d+)%), 200000 words ready; args: a b\n")
  lu.assertNotNil(pid1, one)
  local two = H.sh(run .. "c d")
  local pid2, server2 = two:match("hello from pid (%d+) %(server (%d+)%), 200000 words ready; args: c d\n")
  lu.assertEquals(server2, server1)  -- the same resident server, a new call
  lu.assertNotEquals(pid2, pid1)
  H.sh(("cd %s && %s --kill %s/examples/interp.lua"):format(dir, client, root))
  H.wait_until(function () return not H.alive(tonumber(server1)) end, 10, "the server to go")
  os.execute("rm -rf " .. dir)
  -- run directly, it runs straight through in one process
  local direct = H.sh(H.lua .. " examples/interp.lua e f")
  local pid3, parent = direct:match("hello from pid (%d+) %(server (%d+)%), 200000 words ready; args: e f\n")
  lu.assertNotNil(pid3, direct)
  lu.assertNotEquals(parent, server1)
end

--- the README's "A server in ten lines" as printed there, and its client
-- one-liner: both run as they are (the port changed to a free one)
function TestExamples:test_readme_server_in_ten_lines ()
  local readme = H.readfile("README.md")
  local code = readme:match("## A server in ten lines\n\n```lua\n(.-)```")
  local client = readme:match("try it from another terminal: `(lua5%.4 %-e .-)`%.?\n")
  lu.assertNotNil(code)
  lu.assertNotNil(client)
  local _, lines = code:gsub("\n", "")
  lu.assertTrue(lines <= 12, lines .. " lines")
  local port = H.freeport()
  local app = H.tmpname() .. ".lua"
  H.writefile(app, (code:gsub("8080", port)))
  local p = H.spawn(H.lua .. " " .. app)
  H.ready(p, 4)
  local said = H.sh((client:gsub("8080", port)))
  lu.assertEquals(said, "you said: hi\n")
  p:kill("INT")  -- Ctrl-C
  lu.assertEquals({p:wait(10)}, {"exit", 0})
  os.remove(app)
end


os.exit(lu.LuaUnit.run())
