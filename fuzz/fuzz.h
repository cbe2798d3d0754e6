/*
** fuzz/fuzz.h: what every libFuzzer target here shares. A target defines
** HARNESS, a Lua chunk that returns the function to call per input, and
** includes this file: it makes a Lua state with prefork.core preloaded
** (linked in, instrumented), runs HARNESS once, and calls its function
** with each input through fuzz_call, aborting when it raises.
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


int LLVMFuzzerInitialize (int *argc, char ***argv) {
  (void)argc; (void)argv;
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "prefork.core", luaopen_prefork_core, 0);
  lua_pop(L, 1);
  if (luaL_dostring(L, HARNESS) != LUA_OK) {
    fprintf(stderr, "harness: %s\n", lua_tostring(L, -1));
    exit(2);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz");
  return 0;
}


/* push the harness function; then its nargs arguments; then call this */
static void fuzz_push (void) {
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz");
}


static void fuzz_call (int nargs, const char *what) {
  if (lua_pcall(L, nargs, 0, 0) != LUA_OK) {
    fprintf(stderr, "%s: %s\n", what, lua_tostring(L, -1));
    abort();
  }
  lua_gc(L, LUA_GCCOLLECT, 0);
}
