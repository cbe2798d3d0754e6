/*
** sock.c: listening sockets (addresses, bind) and connection objects
** (buffered reads in io.read's formats, writes, timeouts).
*/

#include <errno.h>
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


/* first size of a connection's read buffer */
#if !defined(PF_BUFSIZE)
#define PF_BUFSIZE	16384
#endif

#define ADDRLEN	(sizeof(((struct sockaddr_un *)0)->sun_path) + 8)


struct pf_listener {
  int fd;  /* -1 once closed */
  int reuseport;  /* 0; 1 a SO_REUSEPORT socket; 2 a template (bound only) */
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


/* {======================================================
** Listeners
** ======================================================= */

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
                       int reuseport, const char **what) {
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
    if (reuseport
        && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
      goto fail;
  }
  *what = "bind";
  if (bind(fd, sa, len) != 0) goto fail;
  *what = "listen";
  if (reuseport != 2 && listen(fd, backlog) != 0) goto fail;
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
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof(sun.sun_path))
    return luaL_error(L, "bad address 'unix:%s' (path empty or too long)", path);
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, n);
  if (clearstale(path) != 0
      || (l->fd = bindlisten((struct sockaddr *)&sun, sizeof(sun), backlog,
                             0, &what)) < 0)
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
                       int backlog, int reuseport) {
  char host[256];
  const char *port, *what = "bind";
  struct addrinfo hints, *res;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  int r;
  splithost(L, a, host, sizeof(host), &port);
  checkport(L, a, port);
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = host[0] ? AF_UNSPEC : AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
  if (r != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "getaddrinfo: %s", gai_strerror(r));
    return 2;
  }
  l->fd = bindlisten(res->ai_addr, res->ai_addrlen, backlog, reuseport,
                     &what);
  freeaddrinfo(res);
  if (l->fd < 0 || getsockname(l->fd, (struct sockaddr *)&ss, &sl) != 0)
    return pf_fail(L, what);
  fmtaddr((struct sockaddr *)&ss, l->addr, sizeof(l->addr));
  memcpy(&l->sa, &ss, sizeof(ss));
  l->salen = sl;
  l->backlog = backlog;
  l->reuseport = reuseport;
  return 1;
}


/* one of the SO_REUSEPORT siblings of a template */
int pf_listener_reuseport (const pf_listener *l) {
  return l->reuseport == 1;
}


/* a listener's template for SO_REUSEPORT siblings (accept = "reuseport") */
int pf_listener_template (const pf_listener *l) {
  return l->reuseport == 2;
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
                     tpl->backlog, 1, &what);
  if (l->fd < 0) return NULL;
  memcpy(l->addr, tpl->addr, sizeof(l->addr));
  memcpy(&l->sa, &tpl->sa, sizeof(l->sa));
  l->salen = tpl->salen;
  l->backlog = tpl->backlog;
  l->reuseport = 1;
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
  int backlog = (int)luaL_optinteger(L, 2, 1024);
  int tpl = lua_toboolean(L, 3) ? 2 : 0;
  pf_listener *l = newlistener(L);  /* closed until bound: __gc is safe */
  int n = strncmp(a, "unix:", 5) == 0 ? listenunix(L, l, a + 5, backlog)
                                      : listeninet(L, l, a, backlog, tpl);
  return n;  /* the listener on top, or the fail triple */
}


static pf_listener *checkopen (lua_State *L) {
  pf_listener *l = pf_checklistener(L, 1);
  luaL_argcheck(L, l->fd >= 0, 1, "listener is closed");
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


/* listener:accept([timeout]) -> conn | nil, "timeout" | fail triple;
** for programs that accept outside a master's worker */
static int li_accept (lua_State *L) {
  pf_listener *l = checkopen(L);
  lua_Number t = luaL_optnumber(L, 2, -1);
  double dl = t < 0 ? -1 : pf_now() + t;
  pf_conn *c = pf_newconn(L);
  for (;;) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      c->fd = fd;
      return 1;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return pf_fail(L, "accept");
    if (!pf_waitfd(l->fd, POLLIN, dl)) {
      luaL_pushfail(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
  }
}


static int li_tostring (lua_State *L) {
  pf_listener *l = pf_checklistener(L, 1);
  if (l->fd < 0) lua_pushliteral(L, "prefork.listener (closed)");
  else lua_pushfstring(L, "prefork.listener (%s)", l->addr);
  return 1;
}

/* }====================================================== */


/* {======================================================
** Connections
** ======================================================= */

/*
** Wait until fd is ready for events (POLLIN or POLLOUT) or the monotonic
** deadline passes (< 0: no deadline). 1 when ready, 0 on timeout.
*/
int pf_waitfd (int fd, int events, double deadline) {
  struct pollfd p;
  p.fd = fd;
  p.events = (short)events;
  for (;;) {
    int ms = -1, r;
    if (deadline >= 0) {
      double left = deadline - pf_now();
      if (left <= 0) return 0;
      ms = left < 86400.0 ? (int)(left * 1000.0) + 1 : 86400000;  /* a day */
    }
    r = poll(&p, 1, ms);
    if (r > 0) return 1;
    if (r < 0 && errno != EINTR) return 1;  /* let the call say why */
  }
}


/* a new connection object, closed until its owner sets fd */
pf_conn *pf_newconn (lua_State *L) {
  pf_conn *c = (pf_conn *)lua_newuserdatauv(L, sizeof(*c), 0);
  memset(c, 0, sizeof(*c));
  c->fd = -1;
  c->timeout = -1;
  luaL_setmetatable(L, PF_CONN);
  return c;
}


static pf_conn *checkconn (lua_State *L) {
  pf_conn *c = (pf_conn *)luaL_checkudata(L, 1, PF_CONN);
  if (c->fd < 0)
    luaL_error(L, "attempt to use a closed connection");
  return c;
}


static double deadline (const pf_conn *c) {
  return c->timeout < 0 ? -1 : pf_now() + c->timeout;
}


#define AGAIN	(-2)  /* would block: wait for the fd, then try again */


/* read buffers of PF_BUFSIZE kept for the next connections: a worker
** takes one per connection, and 16 KiB is beyond glibc's caches (its
** malloc and free were 3 % of a worker's time in the Connection: close
** benchmark) */
#define NSPAREBUF	64

static char *sparebuf[NSPAREBUF];
static int nsparebuf = 0;

static void putbuf (char *b, size_t cap) {
  if (b != NULL && cap == PF_BUFSIZE && nsparebuf < NSPAREBUF)
    sparebuf[nsparebuf++] = b;
  else
    free(b);
}


/*
** Read more into the buffer: 1 when bytes came, 0 at end of stream,
** AGAIN when none are there yet, -1 with errno on failure.
*/
static int fill (pf_conn *c) {
  if (c->r == c->w) c->r = c->w = 0;
  if (c->cap == 0 && nsparebuf > 0) {
    c->buf = sparebuf[--nsparebuf];
    c->cap = PF_BUFSIZE;
  }
  if (c->w == c->cap) {
    if (c->r > 0) {  /* slide the unread bytes down */
      memmove(c->buf, c->buf + c->r, c->w - c->r);
      c->w -= c->r;
      c->r = 0;
    }
    else {  /* full of unread bytes: grow */
      size_t ncap = c->cap ? 2 * c->cap : PF_BUFSIZE;
      char *nb = (char *)realloc(c->buf, ncap);
      if (nb == NULL) return -1;
      c->buf = nb;
      c->cap = ncap;
    }
  }
  for (;;) {
    ssize_t n = recv(c->fd, c->buf + c->w, c->cap - c->w, 0);
    if (n > 0) {
      c->w += (size_t)n;
      c->wrote = 0;  /* a request is under way: not idle */
      return 1;
    }
    if (n == 0) return 0;
    if (errno == EINTR) continue;
    return errno == EAGAIN || errno == EWOULDBLOCK ? AGAIN : -1;
  }
}


/* take n buffered bytes as a string [-0, +1, m] */
static void take (lua_State *L, pf_conn *c, size_t n, size_t skip) {
  if (n == 0) lua_pushliteral(L, "");  /* buf may still be NULL */
  else lua_pushlstring(L, c->buf + c->r, n);
  c->r += n + skip;
}


/*
** The formats: each pushes its result and returns 1, or returns 0 at end
** of stream with nothing to give, AGAIN, or -1 with errno. What came
** stays buffered across AGAIN: the call is simply made again.
*/
static int readline (lua_State *L, pf_conn *c, int chop) {
  size_t scanned = 0;
  for (;;) {
    const char *nl = NULL;  /* buf is NULL until the first fill */
    int st;
    if (c->w - c->r > scanned)
      nl = (const char *)memchr(c->buf + c->r + scanned, '\n',
                                c->w - c->r - scanned);
    if (nl != NULL) {
      size_t len = (size_t)(nl - (c->buf + c->r)) + 1;
      if (c->maxline > 0 && len - 1 > c->maxline) {
        errno = EMSGSIZE;  /* the bytes stay buffered */
        return -1;
      }
      take(L, c, chop ? len - 1 : len, chop ? 1 : 0);
      return 1;
    }
    scanned = c->w - c->r;
    if (c->maxline > 0 && scanned > c->maxline) {
      errno = EMSGSIZE;  /* the bytes stay buffered */
      return -1;
    }
    st = fill(c);
    if (st < 0) return st;
    if (st == 0) {  /* a last line without its newline */
      if (c->w == c->r) return 0;
      take(L, c, c->w - c->r, 0);
      return 1;
    }
  }
}


/* up to n bytes: fewer only at end of stream */
static int readn (lua_State *L, pf_conn *c, size_t n) {
  int st = 1;
  while (c->w - c->r < n || (n == 0 && c->w == c->r)) {
    st = fill(c);
    if (st <= 0) break;
  }
  if (st < 0) return st;
  if (c->w == c->r && (n > 0 || st == 0)) return 0;
  take(L, c, c->w - c->r < n ? c->w - c->r : n, 0);
  return 1;
}


/* everything up to end of stream */
static int readall (lua_State *L, pf_conn *c) {
  int st;
  while ((st = fill(c)) > 0) {}
  if (st < 0) return st;
  take(L, c, c->w - c->r, 0);
  return 1;
}


static int readone (lua_State *L, pf_conn *c, int arg) {
  const char *f;
  if (lua_type(L, arg) == LUA_TNUMBER) {
    lua_Integer n = luaL_checkinteger(L, arg);
    luaL_argcheck(L, n >= 0, arg, "negative size");
    return readn(L, c, (size_t)n);
  }
  f = luaL_checkstring(L, arg);
  if (*f == '*') f++;  /* Lua 5.1's "*l" */
  switch (*f) {
    case 'l': return readline(L, c, 1);
    case 'L': return readline(L, c, 0);
    case 'a': return readall(L, c);
    default: return luaL_argerror(L, arg, "invalid format");
  }
}


/* the results of a read that stopped at format i: i - 2 came, then nil
** and why */
static int readfailed (lua_State *L, int i, int st, const char *why) {
  if (why == NULL) {
    if (st == 0) why = "closed";
    else if (errno == EMSGSIZE) why = "too long";
    else return (i - 2) + pf_fail(L, "read");
  }
  luaL_pushfail(L);
  lua_pushstring(L, why);
  return (i - 2) + 2;
}


static int readloop (lua_State *L, pf_conn *c, int i, int nargs);

/* a read resumed after its wait in a serve coroutine; ctx: i, nargs */
static int read_k (lua_State *L, int status, lua_KContext ctx) {
  pf_conn *c = (pf_conn *)lua_touserdata(L, 1);
  int i = (int)(ctx >> 16), why = pf_wakereason(L);
  (void)status;
  if (why == PF_TIMEOUT) return readfailed(L, i, -1, "timeout");
  if (why == PF_STOPPING) return readfailed(L, i, -1, "stopping");
  return readloop(L, c, i, (int)(ctx & 0xffff));
}


/* read the formats from argument i on; wait (or yield) when the data is
** not there yet */
static int readloop (lua_State *L, pf_conn *c, int i, int nargs) {
  while (i <= nargs + 1) {
    int st = readone(L, c, i);
    if (st == AGAIN) {
      int w = pf_waitk(L, c->fd, POLLIN, c->dl, c->wrote && c->r == c->w,
                       ((lua_KContext)i << 16) | nargs, read_k);
      if (w == PF_TIMEOUT) return readfailed(L, i, -1, "timeout");
      if (w == PF_STOPPING) return readfailed(L, i, -1, "stopping");
    }
    else if (st <= 0)
      return readfailed(L, i, st, NULL);
    else
      i++;
  }
  return nargs;
}


/*
** conn:read(...) with io.read's formats "l", "L", "a" and sizes. A
** result that cannot be read is nil, followed by "closed" at end of
** stream, "timeout", "too long" (setmaxline), "stopping" (an idle
** connection of a worker that stops), or the fail message; unread bytes
** stay buffered. In a serve coroutine it yields while it waits.
*/
static int c_read (lua_State *L) {
  pf_conn *c = checkconn(L);
  int nargs = lua_gettop(L) - 1;
  if (nargs == 0) {
    lua_pushliteral(L, "l");
    nargs = 1;
  }
  luaL_argcheck(L, nargs < 0xffff, 0xffff, "too many formats");
  luaL_checkstack(L, nargs + 3, "too many arguments");
  c->dl = deadline(c);
  return readloop(L, c, 2, nargs);
}


static int writeloop (lua_State *L, pf_conn *c, size_t off);

/* the connection goes: closing twice is fine */
static void closeconn (pf_conn *c) {
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
    if (c->counted) pf_worker_closed();
  }
  putbuf(c->buf, c->cap);
  c->buf = NULL;
  c->cap = c->r = c->w = 0;
  c->closing = 0;
}


/* a write that failed (the fail triple is pushed first: close may change
** errno); a closing one closes anyway */
static int writefailed (lua_State *L, pf_conn *c, int timedout) {
  int n;
  if (timedout) {
    luaL_pushfail(L);
    lua_pushliteral(L, "timeout");
    n = 2;
  }
  else
    n = pf_fail(L, "write");
  if (c->closing) closeconn(c);
  return n;
}


static int write_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  if (pf_wakereason(L) != PF_READY)
    return writefailed(L, (pf_conn *)lua_touserdata(L, 1), 1);
  return writeloop(L, (pf_conn *)lua_touserdata(L, 1), (size_t)ctx);
}


/* send the string on top of the stack from byte off on; for close(data),
** with MSG_MORE: the last bytes wait for the FIN that close sends, and
** leave with it */
static int writeloop (lua_State *L, pf_conn *c, size_t off) {
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  int flags = MSG_NOSIGNAL | (c->closing ? MSG_MORE : 0);
  while (off < len) {
    ssize_t k = send(c->fd, s + off, len - off, flags);
    if (k >= 0)
      off += (size_t)k;
    else if (errno == EINTR)
      continue;
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
      return writefailed(L, c, 0);
    else if (pf_waitk(L, c->fd, POLLOUT, c->dl, 0, (lua_KContext)off,
                      write_k) != PF_READY)
      return writefailed(L, c, 1);
  }
  c->wrote = 1;  /* an answer went out: reading next waits for a request */
  if (c->closing) closeconn(c);
  lua_pushboolean(L, 1);
  return 1;
}


/* the strings from index 2 on, as one on top of the stack */
static void pushdata (lua_State *L) {
  int n = lua_gettop(L), i;
  if (n == 2) {
    luaL_checkstring(L, 2);
    lua_pushvalue(L, 2);
  }
  else {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (i = 2; i <= n; i++) {
      luaL_checkstring(L, i);
      lua_pushvalue(L, i);
      luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
  }
}


/* conn:write(...) -> true | nil, "timeout" | nil, "write: err", errno;
** in a serve coroutine it yields while the socket is full */
static int c_write (lua_State *L) {
  pf_conn *c = checkconn(L);
  pushdata(L);
  c->dl = deadline(c);
  return writeloop(L, c, 0);
}


/*
** conn:close([data...]) -> true | as write: with data, write it and
** close, so that the last bytes leave with the end of stream (in one TCP
** segment when they fit: Node's socket.end(data)); the connection is
** closed whether the write succeeded or not. Closing twice is fine.
*/
static int c_close (lua_State *L) {
  pf_conn *c;
  if (lua_gettop(L) < 2) {
    closeconn((pf_conn *)luaL_checkudata(L, 1, PF_CONN));
    lua_pushboolean(L, 1);
    return 1;
  }
  c = checkconn(L);
  pushdata(L);
  c->dl = deadline(c);
  c->closing = 1;
  return writeloop(L, c, 0);
}


/* __close and __gc */
static int c_gc (lua_State *L) {
  closeconn((pf_conn *)luaL_checkudata(L, 1, PF_CONN));
  return 0;
}


/* conn:settimeout(seconds | nil): for each later read or write call */
static int c_settimeout (lua_State *L) {
  pf_conn *c = checkconn(L);
  lua_Number t = luaL_optnumber(L, 2, -1);
  c->timeout = t < 0 ? -1 : t;
  lua_settop(L, 1);
  return 1;
}


/* conn:setmaxline(bytes | nil): the longest line "l" and "L" read; a
** longer one gives nil, "too long" (nil: no limit, the default) */
static int c_setmaxline (lua_State *L) {
  pf_conn *c = checkconn(L);
  lua_Integer n = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, n >= 0, 2, "negative size");
  c->maxline = (size_t)n;
  lua_settop(L, 1);
  return 1;
}


static int c_getfd (lua_State *L) {
  pf_conn *c = (pf_conn *)luaL_checkudata(L, 1, PF_CONN);
  lua_pushinteger(L, c->fd);
  return 1;
}


/* conn:peer() -> host, port | path (Unix socket) */
static int c_peer (lua_State *L) {
  pf_conn *c = checkconn(L);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  char host[INET6_ADDRSTRLEN];
  memset(&ss, 0, sizeof(ss));
  if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) != 0)
    return pf_fail(L, "getpeername");
  if (ss.ss_family == AF_UNIX) {
    lua_pushstring(L, ((struct sockaddr_un *)&ss)->sun_path);
    return 1;
  }
  if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    lua_pushstring(L, host);
    lua_pushinteger(L, ntohs(in6->sin6_port));
  }
  else {
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    lua_pushstring(L, host);
    lua_pushinteger(L, ntohs(in->sin_port));
  }
  return 2;
}


/* prefork.socketpair() -> two connected connection objects */
static int l_socketpair (lua_State *L) {
  int sv[2];
  pf_conn *a = pf_newconn(L);
  pf_conn *b = pf_newconn(L);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv))
    return pf_fail(L, "socketpair");
  a->fd = sv[0];
  b->fd = sv[1];
  return 2;
}


/* prefork.conn(fd) -> a connection object that owns fd (a stream
** socket, from recvfds say); the fd is made non-blocking */
static int l_conn (lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  pf_conn *c;
  int fl;
  luaL_argcheck(L, fd >= 0 && fd <= 0x7fffffff, 1, "not an fd");
  c = pf_newconn(L);
  fl = fcntl((int)fd, F_GETFL);
  if (fl < 0 || fcntl((int)fd, F_SETFL, fl | O_NONBLOCK) != 0)
    return pf_fail(L, "fcntl");
  c->fd = (int)fd;
  return 1;
}


/* prefork.close(fd) -> true | fail: for a raw fd (from recvfds) */
static int l_close (lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  luaL_argcheck(L, fd >= 0 && fd <= 0x7fffffff, 1, "not an fd");
  if (close((int)fd) != 0 && errno != EINTR)
    return pf_fail(L, "close");
  lua_pushboolean(L, 1);
  return 1;
}


static int c_tostring (lua_State *L) {
  pf_conn *c = (pf_conn *)luaL_checkudata(L, 1, PF_CONN);
  if (c->fd < 0) lua_pushliteral(L, "prefork.conn (closed)");
  else lua_pushfstring(L, "prefork.conn (fd %d)", c->fd);
  return 1;
}

/* }====================================================== */


static void createmeta (lua_State *L, const char *name, const luaL_Reg *meth,
                        const luaL_Reg *metameth) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, metameth, 0);
  lua_newtable(L);
  luaL_setfuncs(L, meth, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}


void pf_open_sock (lua_State *L) {
  static const luaL_Reg limeth[] = {
    {"getfd", li_getfd}, {"address", li_address}, {"close", li_close},
    {"accept", li_accept}, {"setdefer", li_setdefer},
    {NULL, NULL}
  };
  static const luaL_Reg limetameth[] = {
    {"__gc", li_close}, {"__close", li_close}, {"__tostring", li_tostring},
    {NULL, NULL}
  };
  static const luaL_Reg cmeth[] = {
    {"read", c_read}, {"write", c_write}, {"close", c_close},
    {"settimeout", c_settimeout}, {"setmaxline", c_setmaxline},
    {"getfd", c_getfd}, {"peer", c_peer},
    {NULL, NULL}
  };
  static const luaL_Reg cmetameth[] = {
    {"__gc", c_gc}, {"__close", c_gc}, {"__tostring", c_tostring},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"listen", l_listen},
    {"socketpair", l_socketpair},
    {"conn", l_conn},
    {"close", l_close},
    {NULL, NULL}
  };
  createmeta(L, PF_LISTENER, limeth, limetameth);
  createmeta(L, PF_CONN, cmeth, cmetameth);
  luaL_setfuncs(L, funcs, 0);
}
