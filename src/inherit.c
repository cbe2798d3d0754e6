/*
** inherit.c: what a master inherits: listening sockets by fd (from
** systemd, Server::Starter, einhorn, `fd:N`, or the master it upgrades),
** and the environment variables that name them, which it removes (the
** front, listeners.lua, reads them).
*/

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>

#include "prefork.h"


/* 0 when fd is a listening stream socket, else why not */
static const char *notlistening (int fd) {
  int type = 0, on = 0;
  socklen_t len = sizeof(type);
  if (fcntl(fd, F_GETFD) < 0) return "not an open fd";
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0)
    return errno == ENOTSOCK ? "not a socket" : "not a socket we can use";
  if (type != SOCK_STREAM) return "not a stream socket";
  len = sizeof(on);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) != 0 || !on)
    return "a socket, but not listening";
  return NULL;
}


/*
** core.adopt(fd) -> listener | nil, why: an inherited listening socket
** (close-on-exec and non-blocking from now on); why says what fd is
** instead ("not a socket", "a socket, but not listening", ...).
*/
static int l_adopt (lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  const char *why;
  luaL_argcheck(L, fd >= 0 && fd <= 0x7fffffff, 1, "not an fd");
  if ((why = notlistening((int)fd)) != NULL)
    return pf_failwith(L, why, EBADF);
  fcntl((int)fd, F_SETFD, FD_CLOEXEC);
  fcntl((int)fd, F_SETFL, fcntl((int)fd, F_GETFL) | O_NONBLOCK);
  if (pf_listener_wrap(L, (int)fd) == NULL)
    return pf_fail(L, "getsockname");
  return 1;
}


/* core.unsetenv(name): a variable leaves this process's environment (what
** its children inherit); os.getenv no longer sees it */
static int l_unsetenv (lua_State *L) {
  if (unsetenv(luaL_checkstring(L, 1)) != 0)
    return pf_fail(L, "unsetenv");
  lua_pushboolean(L, 1);
  return 1;
}


/* core.dup(fd) -> a new fd for the same file (close-on-exec) | fail */
static int l_dup (lua_State *L) {
  int fd = fcntl((int)luaL_checkinteger(L, 1), F_DUPFD_CLOEXEC, 3);
  if (fd < 0) return pf_fail(L, "dup");
  lua_pushinteger(L, fd);
  return 1;
}


/* core.environ() -> {"K=V", ...}: this process's environment */
static int l_environ (lua_State *L) {
  int i;
  lua_newtable(L);
  for (i = 0; environ[i] != NULL; i++) {
    lua_pushstring(L, environ[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}


void pf_open_inherit (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"adopt", l_adopt},
    {"unsetenv", l_unsetenv},
    {"environ", l_environ},
    {"dup", l_dup},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
