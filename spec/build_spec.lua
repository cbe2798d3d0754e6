-- The build and the rock: one exported symbol; `luarocks make` installs
-- a working module into a tree of its own, offline.

local lu = require "luaunit"
local H = require "helpers"

TestBuild = {}

function TestBuild:tearDown () H.cleanup() end

local function core_so ()
  local cpath = os.getenv("LUA_CPATH") or ""
  return package.searchpath("prefork.core", cpath)
end

function TestBuild:test_only_luaopen_is_exported ()
  local so = assert(core_so())
  local syms = H.sh("nm -D --defined-only " .. so .. " | awk '{print $3}'")
  lu.assertEquals(syms, "luaopen_prefork_core\n")
end

function TestBuild:test_versions_match ()
  lu.assertEquals(require("prefork")._VERSION, require("prefork.core")._VERSION)
  lu.assertStrMatches(require("prefork")._VERSION, "%d+%.%d+%.%d+")
end

function TestBuild:test_luarocks_make_into_a_tree ()
  local dir = H.tmpname() .. ".d"
  local tree = dir .. "/tree"
  H.sh("mkdir -p " .. dir .. "/src && cp -r src lua-prefork Makefile rockspec LICENSE "
             .. dir .. "/src/")
  local log = H.sh(("cd %s/src && luarocks --lua-version=5.4 make "
                    .. "rockspec/lua-prefork-scm-1.rockspec --tree %s 2>&1; echo EXIT $?")
                   :format(dir, tree))
  lu.assertStrContains(log, "EXIT 0", log)
  lu.assertStrContains(log, "lua-prefork scm-1 is now installed")
  -- a clean Lua sees only the tree: not the checkout
  local out = H.sh(("cd / && env -u LUA_PATH -u LUA_CPATH %s -e '"
    .. "package.path = %q .. \";\" .. package.path "
    .. "package.cpath = %q .. \";\" .. package.cpath "
    .. "local p = require \"prefork\" "
    .. "print(package.searchpath(\"prefork.core\", package.cpath)) "
    .. "local pid = p.fork(function () end) "
    .. "print(select(2, p.wait(pid)))' 2>&1"):format(
      "lua5.4", tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua",
      tree .. "/lib/lua/5.4/?.so"))
  lu.assertEquals(out, tree .. "/lib/lua/5.4/prefork/core.so\nexit\t0\n")
  -- and the client command, in the tree's bin
  lu.assertStrContains(H.sh(tree .. "/bin/lua-prefork --help"), "usage: lua-prefork")
  H.sh("rm -rf " .. dir)
end

os.exit(lu.LuaUnit.run())
