/*
** listen.c: listening sockets: addresses ("host:port", "[v6]:port",
** "unix:/path"), bind and listen, the stale file of a dead server's Unix
** socket, and the SO_REUSEPORT siblings of accept = "reuseport".
*/

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "prefork.h"


/* what a listener is: a plain one; for accept = "reuseport", a template
** (bound with SO_REUSEPORT, not listening: it holds the address) or one
** of its SO_REUSEPORT siblings (listening) */
enum { PLAIN, SIBLING, TEMPLATE };

#define ADDRLEN	(sizeof(((struct sockaddr_un *)0)->sun_path) + 8)


struct pf_listener {
  int fd;  /* -1 once closed */
  int kind;  /* PLAIN, SIBLING or TEMPLATE */
  int backlog;
  struct sockaddr_storage sa;  /* the bound address (a TCP one) */
  socklen_t salen;
  pid_t owner;  /* the process that bound it: the only one to unlink */
  dev_t dev;  /* the socket file of a Unix listener, to unlink it */
  ino_t ino;  /* only while it is still ours */
  char addr[ADDRLEN];  /* as addresses() tells it */
};


/* "127.0.0.1:80", "[::1]:80" or "unix:/path" of a bound socket */
static void fmtaddr (const struct sockaddr *sa, char *out, size_t size) {
  char host[INET6_ADDRSTRLEN];
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    snprintf(out, size, "%s:%u", host, (unsigned)ntohs(in->sin_port));
  }
  else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    snprintf(out, size, "[%s]:%u", host, (unsigned)ntohs(in6->sin6_port));
  }
  else if (sa->sa_family == AF_UNIX)
    snprintf(out, size, "unix:%s", ((const struct sockaddr_un *)sa)->sun_path);
  else
    snprintf(out, size, "?");
}


pf_listener *pf_checklistener (lua_State *L, int idx) {
  return (pf_listener *)luaL_checkudata(L, idx, PF_LISTENER);
}


int pf_listener_fd (const pf_listener *l) {
  return l->fd;
}


/* close; the process that bound a Unix socket also removes its file,
** unless somebody has put another file in its place since */
void pf_listener_close (pf_listener *l) {
  struct stat st;
  if (l->fd < 0) return;
  close(l->fd);
  l->fd = -1;
  if (l->ino != 0 && l->owner == getpid()
      && stat(l->addr + 5, &st) == 0
      && st.st_dev == l->dev && st.st_ino == l->ino)
    unlink(l->addr + 5);
}


/*
** Split "host:port", "[v6]:port", "*:port", a bare port (all IPv4
** addresses) into host and port; NULL host for the wildcard. Raises on
** a malformed address: that is a program's mistake, not the system's.
*/
static void splithost (lua_State *L, const char *a, char *host, size_t hs,
                       const char **port) {
  const char *colon = strrchr(a, ':');
  size_t hl;
  if (strstr(a, "://") != NULL)
    luaL_error(L, "bad address '%s' (a URL: an address is host:port, "
               "[v6]:port or unix:/path)", a);
  if (colon == a)
    luaL_error(L, "bad address '%s' (no host: *%s or 0.0.0.0%s for every "
               "IPv4 address)", a, a, a);
  if (colon == NULL) {  /* a bare port */
    host[0] = '\0';
    *port = a;
    return;
  }
  hl = (size_t)(colon - a);
  if (a[0] == '[') {
    if (hl < 2 || a[hl - 1] != ']')
      luaL_error(L, "bad address '%s' (missing ']')", a);
    a++; hl -= 2;
  }
  else if (memchr(a, ':', hl) != NULL)
    luaL_error(L, "bad address '%s' (IPv6 addresses go in brackets)", a);
  if (hl >= hs)
    luaL_error(L, "bad address '%s' (host too long)", a);
  memcpy(host, a, hl);
  host[hl] = '\0';
  if (strcmp(host, "*") == 0) host[0] = '\0';
  *port = colon + 1;
}


static void checkport (lua_State *L, const char *a, const char *port) {
  char *end;
  unsigned long p = strtoul(port, &end, 10);
  if (port[0] == '\0' || *end != '\0' || p > 65535 || port[0] == '-'
      || port[0] == '+' || port[0] == ' ')
    luaL_error(L, "bad address '%s' (bad port '%s')", a, port);
}


/* socket, options, bind, listen; -1 with errno set on failure, and
** "what" naming the call that failed */
static int bindlisten (const struct sockaddr *sa, socklen_t len, int backlog,
                       int kind, const char **what) {
  int one = 1;
  int en;
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  *what = "socket";
  if (fd < 0) return -1;
  if (sa->sa_family != AF_UNIX) {
    *what = "setsockopt";
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
      goto fail;
    if (sa->sa_family == AF_INET6
        && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
      goto fail;
    if (kind != PLAIN
        && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
      goto fail;
  }
  *what = "bind";
  if (bind(fd, sa, len) != 0) goto fail;
  *what = "listen";
  if (kind != TEMPLATE && listen(fd, backlog) != 0) goto fail;
  return fd;
fail:
  en = errno;
  close(fd);
  errno = en;
  return -1;
}


/* a Unix socket file left by a dead server goes; a live one is in use */
static int clearstale (const char *path) {
  struct sockaddr_un sun;
  struct stat st;
  int fd, r, en;
  if (lstat(path, &st) != 0) return 0;  /* nothing there */
  if (!S_ISSOCK(st.st_mode)) {
    errno = EADDRINUSE;
    return -1;
  }
  /* non-blocking: a live server with a full backlog says EAGAIN */
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, strlen(path));
  r = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
  en = errno;
  close(fd);
  if (r == 0 || en == EAGAIN || en == EINPROGRESS) {
    errno = EADDRINUSE;
    return -1;
  }
  if (en == ECONNREFUSED) return unlink(path);
  return 0;  /* let bind say what is wrong */
}


/*
** The parts of "host:port", "[v6]:port", "*:port" or a bare port (connect.c
** shares the parser): the host into host (empty for the wildcard), the
** port's string into *port. Raises on a malformed address.
*/
void pf_parseaddr (lua_State *L, const char *a, char *host, size_t hs,
                   const char **port) {
  splithost(L, a, host, hs, port);
  checkport(L, a, *port);
}


/* the address of the Unix socket at path (after "unix:"); raises when
** the path is empty or too long */
void pf_unixaddr (lua_State *L, const char *path, struct sockaddr_un *sun) {
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof(sun->sun_path))
    luaL_error(L, "bad address 'unix:%s' (path empty or too long)", path);
  memset(sun, 0, sizeof(*sun));
  sun->sun_family = AF_UNIX;
  memcpy(sun->sun_path, path, n);
}


/* a failed getaddrinfo: nil, "getaddrinfo: why", its code (EAI_...:
** negative) where an errno would be (EAI_SYSTEM: the errno) */
int pf_gaifail (lua_State *L, int r) {
  int en = errno;
  luaL_pushfail(L);
  lua_pushfstring(L, "getaddrinfo: %s", r == EAI_SYSTEM ? strerror(en)
                                                       : gai_strerror(r));
  lua_pushinteger(L, r == EAI_SYSTEM ? en : r);
  return 3;
}


static pf_listener *newlistener (lua_State *L) {
  pf_listener *l = (pf_listener *)lua_newuserdatauv(L, sizeof(*l), 0);
  memset(l, 0, sizeof(*l));
  l->fd = -1;
  luaL_setmetatable(L, PF_LISTENER);
  return l;
}


static int listenunix (lua_State *L, pf_listener *l, const char *path,
                       int backlog) {
  struct sockaddr_un sun;
  struct stat st;
  const char *what = "bind";
  pf_unixaddr(L, path, &sun);
  if (clearstale(path) != 0
      || (l->fd = bindlisten((struct sockaddr *)&sun, sizeof(sun), backlog,
                             PLAIN, &what)) < 0)
    return pf_fail(L, what);
  l->owner = getpid();
  if (stat(path, &st) == 0) {
    l->dev = st.st_dev;
    l->ino = st.st_ino;
  }
  snprintf(l->addr, sizeof(l->addr), "unix:%s", path);
  return 1;
}


static int listeninet (lua_State *L, pf_listener *l, const char *a,
                       int backlog, int kind) {
  char host[256];
  const char *port, *what = "bind";
  struct addrinfo hints, *res;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  int r;
  pf_parseaddr(L, a, host, sizeof(host), &port);
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = host[0] ? AF_UNSPEC : AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
  if (r != 0) return pf_gaifail(L, r);
  l->fd = bindlisten(res->ai_addr, res->ai_addrlen, backlog, kind,
                     &what);
  freeaddrinfo(res);
  if (l->fd < 0 || getsockname(l->fd, (struct sockaddr *)&ss, &sl) != 0)
    return pf_fail(L, what);
  fmtaddr((struct sockaddr *)&ss, l->addr, sizeof(l->addr));
  memcpy(&l->sa, &ss, sizeof(ss));
  l->salen = sl;
  l->backlog = backlog;
  l->kind = kind;
  return 1;
}


/* one of the SO_REUSEPORT siblings of a template */
int pf_listener_sibling (const pf_listener *l) {
  return l->kind == SIBLING;
}


/* a listener's template for SO_REUSEPORT siblings (accept = "reuseport") */
int pf_listener_template (const pf_listener *l) {
  return l->kind == TEMPLATE;
}


/*
** A listener object for fd, a listening socket this process inherited
** (it owns fd from now on, but never removes a Unix socket's file: the
** one who bound it does); NULL (nothing pushed) when fd has no address.
** [-0, +(0|1), m]
*/
pf_listener *pf_listener_wrap (lua_State *L, int fd) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  pf_listener *l;
  memset(&ss, 0, sizeof(ss));
  if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) return NULL;
  l = newlistener(L);
  l->fd = fd;
  fmtaddr((struct sockaddr *)&ss, l->addr, sizeof(l->addr));
  if (ss.ss_family != AF_UNIX) {
    memcpy(&l->sa, &ss, sizeof(ss));
    l->salen = sl;
  }
  return l;
}


/*
** A listening SO_REUSEPORT sibling of the template tpl (same address and
** port) on top of the stack; NULL (a closed one pushed, errno set) when
** it cannot be made. [-0, +1, m]
*/
pf_listener *pf_listener_clone (lua_State *L, const pf_listener *tpl) {
  const char *what;
  pf_listener *l = newlistener(L);
  l->fd = bindlisten((const struct sockaddr *)&tpl->sa, tpl->salen,
                     tpl->backlog, SIBLING, &what);
  if (l->fd < 0) return NULL;
  memcpy(l->addr, tpl->addr, sizeof(l->addr));
  memcpy(&l->sa, &tpl->sa, sizeof(l->sa));
  l->salen = tpl->salen;
  l->backlog = tpl->backlog;
  l->kind = SIBLING;
  return l;
}


/*
** core.listen(address [, backlog [, template]]) -> listener | fail
** address: "host:port", "[v6]:port", "*:port", port, or "unix:/path".
** A template (TCP only) is bound with SO_REUSEPORT and not listening: it
** holds the address for the per-worker sockets of accept = "reuseport".
** A malformed address raises.
*/
static int l_listen (lua_State *L) {
  const char *a = lua_type(L, 1) == LUA_TNUMBER
                  ? lua_tostring(L, 1) : luaL_checkstring(L, 1);
  lua_Integer backlog = luaL_optinteger(L, 2, 1024);
  int kind = lua_toboolean(L, 3) ? TEMPLATE : PLAIN;
  pf_listener *l;
  luaL_argcheck(L, backlog >= 1 && backlog <= INT_MAX, 2,
                "backlog must be a positive integer");
  l = newlistener(L);  /* closed until bound: __gc is safe */
  return strncmp(a, "unix:", 5) == 0
         ? listenunix(L, l, a + 5, (int)backlog)
         : listeninet(L, l, a, (int)backlog, kind);  /* the listener on top, or the fail triple */
}


static pf_listener *checkopen (lua_State *L) {
  pf_listener *l = pf_checklistener(L, 1);
  if (l->fd < 0)
    luaL_error(L, "attempt to use a closed listener");
  return l;
}


static int li_getfd (lua_State *L) {
  lua_pushinteger(L, pf_checklistener(L, 1)->fd);
  return 1;
}


static int li_address (lua_State *L) {
  lua_pushstring(L, checkopen(L)->addr);
  return 1;
}


/* listener:own(on): whether this process removes a Unix socket's file
** when it closes the listener (one bound here does; an inherited one
** does not, unless it is taken over from the master it upgrades) */
static int li_own (lua_State *L) {
  pf_listener *l = checkopen(L);
  struct stat st;
  l->ino = 0;
  l->owner = 0;
  if (lua_toboolean(L, 2) && strncmp(l->addr, "unix:", 5) == 0
      && stat(l->addr + 5, &st) == 0) {
    l->owner = getpid();
    l->dev = st.st_dev;
    l->ino = st.st_ino;
  }
  lua_settop(L, 1);
  return 1;
}


/* listener:template() -> true for a reuseport template (not listening) */
static int li_template (lua_State *L) {
  lua_pushboolean(L, pf_listener_template(checkopen(L)));
  return 1;
}


static int li_close (lua_State *L) {
  pf_listener_close(pf_checklistener(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}


/* listener:setdefer(seconds): accept a TCP connection only once its
** first bytes came (TCP_DEFER_ACCEPT), or after that many seconds; for
** protocols where the client speaks first. 0 turns it off. */
static int li_setdefer (lua_State *L) {
  pf_listener *l = checkopen(L);
  int secs = (int)luaL_checkinteger(L, 2);
  luaL_argcheck(L, secs >= 0, 2, "negative time");
  if (strncmp(l->addr, "unix:", 5) != 0
      && setsockopt(l->fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &secs,
                    sizeof(secs)) != 0)
    return pf_fail(L, "setsockopt");
  lua_pushboolean(L, 1);
  return 1;
}


static int acceptloop (lua_State *L);

static int accept_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  if (pf_wakereason(L) != PF_READY)
    return pf_failwith(L, "timeout", ETIMEDOUT);
  return acceptloop(L);
}


/* accept on the listener at 1, until the deadline at 3; the connection
** object waits at 4 */
static int acceptloop (lua_State *L) {
  pf_listener *l = checkopen(L);
  pf_conn *c = (pf_conn *)lua_touserdata(L, 4);
  for (;;) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      c->fd = fd;
      return 1;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return pf_fail(L, "accept");
    if (pf_waitk(L, l->fd, POLLIN, lua_tonumber(L, 3), 0, 0,
                 accept_k) != PF_READY)
      return pf_failwith(L, "timeout", ETIMEDOUT);
  }
}


/* listener:accept([timeout]) -> conn | nil, "timeout" | fail triple;
** for programs that accept outside a master's worker; yields in a task */
static int li_accept (lua_State *L) {
  lua_Number t;
  checkopen(L);
  t = luaL_optnumber(L, 2, -1);
  lua_settop(L, 1);
  lua_pushnil(L);
  lua_pushnumber(L, pf_deadline(t));
  pf_newconn(L);
  return acceptloop(L);
}


static int li_tostring (lua_State *L) {
  pf_listener *l = pf_checklistener(L, 1);
  if (l->fd < 0) lua_pushliteral(L, "prefork.listener (closed)");
  else lua_pushfstring(L, "prefork.listener (%s)", l->addr);
  return 1;
}


void pf_open_listen (lua_State *L) {
  static const luaL_Reg meth[] = {
    {"getfd", li_getfd}, {"address", li_address}, {"close", li_close},
    {"accept", li_accept}, {"setdefer", li_setdefer}, {"own", li_own},
    {"template", li_template},
    {NULL, NULL}
  };
  static const luaL_Reg metameth[] = {
    {"__gc", li_close}, {"__close", li_close}, {"__tostring", li_tostring},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"listen", l_listen},
    {NULL, NULL}
  };
  pf_newclass(L, PF_LISTENER, meth, metameth);
  luaL_setfuncs(L, funcs, 0);
}
