/*
** core.c: prefork.core, the C half of the prefork module. Each file
** registers its own functions into the one module table.
*/

#include <unistd.h>

#include "prefork.h"


/* core.ncpu() -> online processors */
static int l_ncpu (lua_State *L) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}


/* the one exported symbol: the build hides the rest */
#define PF_EXPORT	LUAMOD_API __attribute__((visibility("default")))

PF_EXPORT int luaopen_prefork_core (lua_State *L);

PF_EXPORT int luaopen_prefork_core (lua_State *L) {
  lua_newtable(L);
  pf_open_loop(L);
  pf_open_proc(L);
  pf_open_serial(L);
  pf_open_task(L);
  pf_open_conn(L);
  pf_open_listen(L);
  pf_open_connect(L);
  pf_open_inherit(L);
  pf_open_fdpass(L);
  pf_open_worker(L);
  pf_open_serve(L);
  pf_open_master(L);
  pf_open_notify(L);
  pf_open_pool(L);
  pf_open_interp(L);
  lua_pushcfunction(L, l_ncpu);
  lua_setfield(L, -2, "ncpu");
  lua_pushliteral(L, PF_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
