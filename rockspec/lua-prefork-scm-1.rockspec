rockspec_format = "3.0"
package = "lua-prefork"
version = "scm-1"
source = {
  url = "git+https://example.invalid/lua-prefork.git",  -- `luarocks make` builds the checkout
}
description = {
  summary = "Preforking servers, fd passing, process pools and resident scripts for Lua",
  detailed = [[
A Lua 5.4 module, written in C on libev: a master that opens the listening
sockets and keeps a set of forked workers alive (respawn with backoff,
reload on SIGHUP, scaling on SIGTTIN/SIGTTOU, graceful stop). prefork.interp
serves scripts resident behind chiark-utils' prefork-interp protocol.
Installs prefork/core.so, prefork/init.lua and prefork/interp.lua (`make install`).
]],
  license = "MIT",
  labels = {"server", "fork", "process", "libev"},
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  LIBEV = {header = "ev.h", library = "ev"},
  NETTLE = {header = "nettle/sha2.h"},  -- linked statically into lua-prefork
}
build = {
  type = "make",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    EV_CFLAGS = "-I$(LIBEV_INCDIR)",
    EV_LDFLAGS = "-L$(LIBEV_LIBDIR)",
  },
  install_variables = {
    PREFIX = "$(PREFIX)",
    LIBDIR = "$(LIBDIR)",
    LUADIR = "$(LUADIR)",
    BINDIR = "$(BINDIR)",
  },
}
