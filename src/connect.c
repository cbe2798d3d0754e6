/*
** connect.c: outgoing connections. prefork.connect opens a connection
** object (conn.c's) to "host:port", "[v6]:port" or "unix:/path" without
** blocking the process: a non-blocking connect(2) to each address in
** turn, waiting (pf_waitk: yielding in a task, polling elsewhere) until
** the socket is writable and SO_ERROR tells how it went. Also the socket
** calls that prefork.socket (LuaSocket's surface, in Lua) needs: options,
** names, shutdown.
*/

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "prefork.h"


/* addresses of one name tried at most */
#define MAXADDRS	16

typedef struct target {
  struct sockaddr_storage sa;
  socklen_t len;
} target;

/* a connect under way (a userdata on the caller's stack, so that a
** coroutine abandoned in its wait leaks nothing) */
typedef struct attempt {
  double timeout;  /* seconds, also the connection's; < 0: none */
  double dl;  /* the deadline of the whole connect; < 0: none */
  int n, i;  /* addresses, the one tried now */
  int err;  /* the errno of the last address that failed */
  target t[MAXADDRS];
} attempt;

/* where l_connect keeps them on the stack */
#define ATTEMPT	4
#define CONN	5


/* the addresses of a into at: 0, or getaddrinfo's code; a malformed
** address raises (listen.c's messages) */
static int resolve (lua_State *L, const char *a, int family, attempt *at) {
  char host[256];
  const char *port;
  struct addrinfo hints, *res, *p;
  int r;
  if (strncmp(a, "unix:", 5) == 0) {
    struct sockaddr_un sun;
    pf_unixaddr(L, a + 5, &sun);
    memcpy(&at->t[0].sa, &sun, sizeof(sun));
    at->t[0].len = sizeof(sun);
    at->n = 1;
    return 0;
  }
  pf_parseaddr(L, a, host, sizeof(host), &port);
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = family;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
  if (r != 0) return r;
  for (p = res; p != NULL && at->n < MAXADDRS; p = p->ai_next) {
    if (p->ai_addrlen > sizeof(at->t[0].sa)) continue;
    memcpy(&at->t[at->n].sa, p->ai_addr, p->ai_addrlen);
    at->t[at->n++].len = p->ai_addrlen;
  }
  freeaddrinfo(res);
  return 0;
}


/* done: the connection, with its timeout, marked as ours */
static int connected (lua_State *L, pf_conn *c, const attempt *at) {
  c->timeout = at->timeout;
  c->outgoing = 1;
  lua_settop(L, CONN);
  return 1;
}


/* the address tried failed with en: on to the next */
static void nextaddr (attempt *at, pf_conn *c, int en) {
  at->err = en;
  close(c->fd);
  c->fd = -1;
  at->i++;
}


static int connectloop (lua_State *L);

/* the wait for a connect in progress ended (how) */
static int waited (lua_State *L, int how) {
  attempt *at = (attempt *)lua_touserdata(L, ATTEMPT);
  pf_conn *c = (pf_conn *)lua_touserdata(L, CONN);
  int en = 0;
  socklen_t sl = sizeof(en);
  if (how != PF_READY) {
    close(c->fd);
    c->fd = -1;
    return pf_failwith(L, "timeout", ETIMEDOUT);
  }
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &en, &sl) != 0) en = errno;
  if (en == 0) return connected(L, c, at);
  nextaddr(at, c, en);
  return connectloop(L);
}


static int connect_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return waited(L, pf_wakereason(L));
}


/* try the addresses from at->i on: the connection, or the failure of
** the last one */
static int connectloop (lua_State *L) {
  attempt *at = (attempt *)lua_touserdata(L, ATTEMPT);
  pf_conn *c = (pf_conn *)lua_touserdata(L, CONN);
  while (at->i < at->n) {
    const target *t = &at->t[at->i];
    c->fd = socket(t->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                   0);
    if (c->fd < 0 && errno != EAFNOSUPPORT) return pf_fail(L, "socket");
    if (c->fd < 0) {  /* (no IPv6 here, say) */
      at->err = errno;
      at->i++;
      continue;
    }
    if (connect(c->fd, (const struct sockaddr *)&t->sa, t->len) == 0)
      return connected(L, c, at);
    if (errno == EINPROGRESS || errno == EINTR)
      return waited(L, pf_waitk(L, c->fd, POLLOUT, at->dl, 0, 0, connect_k));
    nextaddr(at, c, errno);
  }
  errno = at->err;
  return pf_fail(L, "connect");
}


/*
** prefork.connect(address [, timeout [, family]]) -> conn | nil, why, errno
** address: "host:port", "[v6]:port" or "unix:/path"; timeout bounds the
** whole connect (every address of the name) and becomes the connection's;
** family: "tcp4" or "tcp6" to take only those addresses of a name. In a
** task it yields while it waits. Failures: "connect: strerror" (of the
** last address tried), "timeout", "getaddrinfo: ..." (its code as the
** errno); a malformed address raises.
*/
static int l_connect (lua_State *L) {
  static const char *const names[] = {"any", "tcp4", "tcp6", NULL};
  static const int families[] = {AF_UNSPEC, AF_INET, AF_INET6};
  const char *a = (luaL_checktype(L, 1, LUA_TSTRING), lua_tostring(L, 1));
  lua_Number t = luaL_optnumber(L, 2, -1);
  int family = families[luaL_checkoption(L, 3, "any", names)];
  attempt *at;
  int r;
  luaL_argcheck(L, lua_isnoneornil(L, 2) || t >= 0, 2, "negative timeout");
  lua_settop(L, 3);
  at = (attempt *)lua_newuserdatauv(L, sizeof(*at), 0);
  memset(at, 0, sizeof(*at));
  at->timeout = t;
  at->dl = pf_deadline(t);
  r = resolve(L, a, family, at);
  if (r != 0) return pf_gaifail(L, r);
  pf_newconn(L);
  return connectloop(L);
}


/* {======================================================
** The socket calls of prefork.socket (LuaSocket's surface)
** ======================================================= */

/* core.sockopt(sock, name [, on]) -> the option's value (without on) |
** true | fail; name: "tcp-nodelay", "keepalive", "reuseaddr",
** "reuseport", "acceptconn" (read only) */
static int l_sockopt (lua_State *L) {
  static const char *const names[] = {"tcp-nodelay", "keepalive",
    "reuseaddr", "reuseport", "acceptconn", NULL};
  static const int levels[] = {IPPROTO_TCP, SOL_SOCKET, SOL_SOCKET,
                               SOL_SOCKET, SOL_SOCKET};
  static const int opts[] = {TCP_NODELAY, SO_KEEPALIVE, SO_REUSEADDR,
                             SO_REUSEPORT, SO_ACCEPTCONN};
  int fd = pf_tofd(L, 1);
  int i = luaL_checkoption(L, 2, NULL, names);
  int v = 0;
  socklen_t sl = sizeof(v);
  if (lua_isnoneornil(L, 3)) {
    if (getsockopt(fd, levels[i], opts[i], &v, &sl) != 0)
      return pf_fail(L, "getsockopt");
    lua_pushboolean(L, v);
    return 1;
  }
  luaL_argcheck(L, opts[i] != SO_ACCEPTCONN, 2, "a read-only option");
  v = lua_toboolean(L, 3);
  if (setsockopt(fd, levels[i], opts[i], &v, sizeof(v)) != 0)
    return pf_fail(L, "setsockopt");
  lua_pushboolean(L, 1);
  return 1;
}


/* core.sockname(sock [, peer]) -> host, port, family ("inet", "inet6")
** | path, nil, "unix" | fail: the socket's own address, or its peer's */
static int l_sockname (lua_State *L) {
  int fd = pf_tofd(L, 1), peer = lua_toboolean(L, 2), r;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  memset(&ss, 0, sizeof(ss));
  r = peer ? getpeername(fd, (struct sockaddr *)&ss, &sl)
           : getsockname(fd, (struct sockaddr *)&ss, &sl);
  if (r != 0) return pf_fail(L, peer ? "getpeername" : "getsockname");
  if (ss.ss_family == AF_UNIX) {
    lua_pushstring(L, ((struct sockaddr_un *)&ss)->sun_path);
    lua_pushnil(L);
    lua_pushliteral(L, "unix");
    return 3;
  }
  r = getnameinfo((struct sockaddr *)&ss, sl, host, sizeof(host), serv,
                  sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV);
  if (r != 0) return pf_gaifail(L, r);
  lua_pushstring(L, host);
  lua_pushinteger(L, (lua_Integer)strtol(serv, NULL, 10));
  lua_pushstring(L, ss.ss_family == AF_INET6 ? "inet6" : "inet");
  return 3;
}


/* core.shutdown(sock [, "both"|"send"|"receive"]) -> true | fail */
static int l_shutdown (lua_State *L) {
  static const char *const names[] = {"both", "send", "receive", NULL};
  static const int hows[] = {SHUT_RDWR, SHUT_WR, SHUT_RD};
  int fd = pf_tofd(L, 1);
  int how = hows[luaL_checkoption(L, 2, "both", names)];
  if (shutdown(fd, how) != 0) return pf_fail(L, "shutdown");
  lua_pushboolean(L, 1);
  return 1;
}


/* }====================================================== */


void pf_open_connect (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"connect", l_connect},
    {"sockopt", l_sockopt},
    {"sockname", l_sockname},
    {"shutdown", l_shutdown},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
