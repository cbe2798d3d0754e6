/*
** fuzz/http_request.c: libFuzzer target for the HTTP request reader of
** examples/http.lua (examples/http_request.lua) over a real connection
** object: the input is written into one end of prefork.socketpair() and
** read back by read_request from the other, through conn:read's buffer.
** read_request must never raise; it returns the request or nil, reason.
** Run from the checkout: make fuzz.
*/

#include <stdio.h>
#include <stdlib.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

int luaopen_prefork_core (lua_State *L);
int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);

static lua_State *L;

static const char harness[] =
  "package.path = 'examples/?.lua;' .. package.path\n"
  "local core = require 'prefork.core'\n"
  "local read_request = require 'http_request'\n"
  "return function (data)\n"
  "  local a, b = core.socketpair()\n"
  "  assert(a:write(data))\n"
  "  a:close()\n"
  "  b:settimeout(1)\n"
  "  local req, err = read_request(b)\n"
  "  b:close()\n"
  "  if req then\n"
  "    assert(type(req.method) == 'string' and type(req.headers) == 'table')\n"
  "  else\n"
  "    assert(type(err) == 'string', 'no reason')\n"
  "  end\n"
  "end\n";


int LLVMFuzzerInitialize (int *argc, char ***argv) {
  (void)argc; (void)argv;
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "prefork.core", luaopen_prefork_core, 0);
  lua_pop(L, 1);
  if (luaL_dostring(L, harness) != LUA_OK) {
    fprintf(stderr, "harness: %s\n", lua_tostring(L, -1));
    exit(2);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz");
  return 0;
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  if (size > 65536) return 0;  /* one socket buffer: the write cannot block */
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz");
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "read_request raised: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
