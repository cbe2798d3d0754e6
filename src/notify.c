/*
** notify.c: systemd's notification protocol, without libsystemd: a
** datagram of "KEY=VALUE" lines to the socket NOTIFY_SOCKET names (a
** path, or "@name" in the abstract namespace); and the watchdog's
** keep-alive (WATCHDOG=1 every WATCHDOG_USEC / 2, when the service has a
** watchdog for this process): the one timer it adds to the master.
*/

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <ev.h>

#include "prefork.h"


/* send msg to NOTIFY_SOCKET: 1 sent, 0 no such variable, -1 with errno */
static int notify (const char *msg) {
  const char *to = getenv("NOTIFY_SOCKET");
  struct sockaddr_un sun;
  size_t n;
  socklen_t len;
  int fd, r, en;
  if (to == NULL || to[0] == '\0') return 0;
  n = strlen(to);
  if ((to[0] != '/' && to[0] != '@') || n >= sizeof(sun.sun_path)) {
    errno = EINVAL;
    return -1;
  }
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, to, n);
  if (to[0] == '@') sun.sun_path[0] = '\0';  /* abstract: no NUL at its end */
  len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n
                    + (to[0] == '/'));
  if ((fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0) return -1;
  r = (int)sendto(fd, msg, strlen(msg), MSG_NOSIGNAL,
                  (struct sockaddr *)&sun, len);
  en = errno;
  close(fd);
  errno = en;
  return r < 0 ? -1 : 1;
}


/* core.notify(msg) -> true | false (no NOTIFY_SOCKET) | fail */
static int l_notify (lua_State *L) {
  int r = notify(luaL_checkstring(L, 1));
  if (r < 0) return pf_fail(L, "sd_notify");
  lua_pushboolean(L, r);
  return 1;
}


/* {------------------------------------------------------
** The watchdog's keep-alive
** ------------------------------------------------------- */

static ev_timer keepalive;


static void onkeepalive (struct ev_loop *loop, ev_timer *t, int revents) {
  (void)loop; (void)t; (void)revents;
  notify("WATCHDOG=1");
}


/* seconds between keep-alives for this process, 0 none */
static double keepalivesecs (void) {
  const char *usec = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
  double us = usec != NULL ? strtod(usec, NULL) : 0;
  if (pid != NULL && strtol(pid, NULL, 10) != (long)getpid()) return 0;
  return us > 0 ? us / 2e6 : 0;
}


/* core.watchdog(on) -> seconds between keep-alives (0: no watchdog): on
** the master's loop, WATCHDOG=1 while it runs */
static int l_watchdog (lua_State *L) {
  double secs = keepalivesecs();
  if (!pf_haveloop()) secs = 0;  /* (EV_DEFAULT would make the loop) */
  else ev_timer_stop(EV_DEFAULT, &keepalive);
  if (lua_toboolean(L, 1) && secs > 0) {
    ev_timer_init(&keepalive, onkeepalive, secs, secs);
    ev_timer_start(EV_DEFAULT, &keepalive);
    notify("WATCHDOG=1");
  }
  lua_pushnumber(L, secs);
  return 1;
}

/* }------------------------------------------------------ */


void pf_open_notify (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"notify", l_notify},
    {"watchdog", l_watchdog},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
