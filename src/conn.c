/*
** conn.c: connection objects: a stream socket with a read buffer, read in
** io.read's formats, written, closed (the last bytes with the FIN), each
** call bounded by the connection's timeout; in a task (task.c) a call
** that must wait yields. Also the fd of any Lua value that has one, and
** waits on such fds.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "prefork.h"
#include "lualib.h"


/* first size of a connection's read buffer */
#if !defined(PF_BUFSIZE)
#define PF_BUFSIZE	16384
#endif


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


#define AGAIN	(-2)  /* would block: wait for the fd, then try again */


/* c->dl of a call that has not waited yet: its timeout counts from its
** first wait (most reads and writes never wait: no clock read for them) */
#define LATER	(-2.0)

static double deadline (pf_conn *c) {
  if (c->dl == LATER) c->dl = pf_deadline(c->timeout);
  return c->dl;
}


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


/* the spare buffers go with the state that loaded this library: closing
** it unloads the library, and a buffer kept past that would be lost */
static int freebufs (lua_State *L) {
  (void)L;
  while (nsparebuf > 0)
    free(sparebuf[--nsparebuf]);
  return 0;
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
  if (c->drained) return AGAIN;  /* nothing there yet, probably: wait first */
  for (;;) {
    size_t room = c->cap - c->w;
    ssize_t n = recv(c->fd, c->buf + c->w, room, 0);
    if (n > 0) {
      c->drained = (size_t)n < room;  /* the socket had no more, probably */
      c->w += (size_t)n;
      c->wrote = 0;  /* a request is under way: not idle */
      pf_beat();
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
static int readtoend (lua_State *L, pf_conn *c) {
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
    case 'a': return readtoend(L, c);
    default:
      return luaL_error(L, "conn:read: invalid format '%s' (\"l\", \"L\", \"a\" "
                        "or a number of bytes)", f);
  }
}


/*
** The results of a failed read or write: nil, why, errno. why is a word
** of ours ("closed": end of stream, errno 0; "timeout"; "too long";
** "stopping"), or "read: strerror" / "write: strerror". [-0, +3, m]
*/
static int failed (lua_State *L, const char *what, const char *why, int en) {
  if (why != NULL) return pf_failwith(L, why, en);
  errno = en;
  return pf_fail(L, what);
}



/* a read that stopped at format i: the i - 2 results that came, then the
** failure (st: 0 at end of stream, else errno tells) */
static int readfailed (lua_State *L, int i, int st) {
  int en = errno;
  if (st == 0) return (i - 2) + failed(L, "read", "closed", 0);
  if (en == EMSGSIZE) return (i - 2) + failed(L, "read", "too long", en);
  return (i - 2) + failed(L, "read", NULL, en);
}


static int readloop (lua_State *L, pf_conn *c, int i, int nargs, int how);

/* a read resumed after its wait in a serve coroutine; ctx: i, nargs */
static int read_k (lua_State *L, int status, lua_KContext ctx) {
  pf_conn *c = (pf_conn *)lua_touserdata(L, 1);
  (void)status;
  return readloop(L, c, (int)(ctx >> 16), (int)(ctx & 0xffff),
                  pf_wakereason(L));
}


/* read the formats from argument i on; wait (or yield) when the data is
** not there yet. how: how the last wait ended, NOWAIT before the first.
** A wait that began without a recv (the socket seemed drained) and ended
** in a timeout or a stop looks once more before it fails. */
#define NOWAIT	2
static int readloop (lua_State *L, pf_conn *c, int i, int nargs, int how) {
  for (;;) {
    int st;
    if (how != NOWAIT) {  /* after a wait, the next fill reads */
      int looked = !c->drained;
      c->drained = 0;
      if (how != PF_READY && looked)
        return (i - 2) + pf_pushwait(L, how);
    }
    while ((st = readone(L, c, i)) > 0 && i <= nargs)
      i++;
    if (st > 0) return nargs;
    if (st != AGAIN) return readfailed(L, i, st);
    if (how != NOWAIT && how != PF_READY)  /* it looked once more */
      return (i - 2) + pf_pushwait(L, how);
    how = pf_waitk(L, c->fd, POLLIN, deadline(c), PF_WAITSAMEFD
                   | (c->wrote && c->r == c->w ? PF_WAITIDLE : 0),
                   ((lua_KContext)i << 16) | nargs, read_k);
  }
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
  c->dl = LATER;
  return readloop(L, c, 2, nargs, NOWAIT);
}


static int writeloop (lua_State *L, pf_conn *c, size_t off);

/* the connection goes: closing twice is fine */
static void closeconn (pf_conn *c) {
  if (c->fd >= 0) {
    pf_fdclosed();
    close(c->fd);
    c->fd = -1;
    if (c->counter != NULL) pf_add(*c->counter, -1);
    c->counter = NULL;
  }
  putbuf(c->buf, c->cap);
  c->buf = NULL;
  c->cap = c->r = c->w = 0;
  c->closing = c->drained = 0;
}


/* a write that failed (how: PF_READY when send failed, with errno) after
** sent bytes went out: nil, why, errno, sent; a closing one closes
** anyway (after the results: close may change errno) */
static int writefailed (lua_State *L, pf_conn *c, int how, size_t sent) {
  int n = how == PF_READY ? failed(L, "write", NULL, errno)
                          : pf_pushwait(L, how);  /* "timeout", "stopping" */
  lua_pushinteger(L, (lua_Integer)sent);
  if (c->closing) closeconn(c);
  return n + 1;
}


static int write_k (lua_State *L, int status, lua_KContext ctx) {
  int how = pf_wakereason(L);
  (void)status;
  if (how != PF_READY)
    return writefailed(L, (pf_conn *)lua_touserdata(L, 1), how, (size_t)ctx);
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
    int how;
    if (k >= 0) {
      off += (size_t)k;
      pf_beat();
    }
    else if (errno == EINTR)
      continue;
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
      return writefailed(L, c, PF_READY, off);
    else if ((how = pf_waitk(L, c->fd, POLLOUT, deadline(c), PF_WAITSAMEFD,
                             (lua_KContext)off, write_k)) != PF_READY)
      return writefailed(L, c, how, off);
  }
  /* an answer went out: reading next waits for a request; but on a
  ** connection we opened a request went out, and reading waits for its
  ** answer (a stop must not cut it as idle) */
  c->wrote = !c->outgoing;
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
  c->dl = LATER;
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
  c->dl = LATER;
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


/*
** conn:detach() -> fd, data: the fd leaves the object (closed from now
** on, it no longer owns it; still non-blocking), with the bytes read into
** the buffer and not taken yet ("" when none), which a new owner of the
** fd must see first.
*/
static int c_detach (lua_State *L) {
  pf_conn *c = checkconn(L);
  lua_pushinteger(L, c->fd);
  lua_pushlstring(L, c->buf != NULL ? c->buf + c->r : "", c->w - c->r);
  pf_fdclosed();  /* the fd's next owner may close it: no kept registration */
  c->fd = -1;
  if (c->counter != NULL) pf_add(*c->counter, -1);
  c->counter = NULL;
  closeconn(c);  /* the buffer goes */
  return 2;
}


/* conn:pending() -> the bytes read and not taken yet (LuaSocket's dirty) */
static int c_pending (lua_State *L) {
  pf_conn *c = checkconn(L);
  lua_pushinteger(L, (lua_Integer)(c->w - c->r));
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
  pf_fdclosed();  /* it may be a connection's */
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


/* {======================================================
** The fds of Lua values
** ======================================================= */

/*
** The fd of the value at idx: an integer, a connection, a Lua file
** handle, or an object with a getfd method (a listener, a LuaSocket
** object). Raises for
** anything else, or for a closed one.
*/
/* the fd of the value at idx, or -1 with *why set */
static int testfd (lua_State *L, int idx, const char **why) {
  int fd = -1;
  *why = "closed";
  if (lua_type(L, idx) == LUA_TNUMBER) {  /* (LuaSocket's getfd: a float) */
    int isint;
    lua_Integer n = lua_tointegerx(L, idx, &isint);
    *why = "not an fd";
    return isint && n >= 0 && n <= 0x7fffffff ? (int)n : -1;
  }
  else if (luaL_testudata(L, idx, PF_CONN))
    fd = ((pf_conn *)lua_touserdata(L, idx))->fd;
  else if (luaL_testudata(L, idx, LUA_FILEHANDLE)) {
    luaL_Stream *s = (luaL_Stream *)lua_touserdata(L, idx);
    fd = s->closef != NULL ? fileno(s->f) : -1;
  }
  else if ((lua_type(L, idx) == LUA_TUSERDATA || lua_type(L, idx) == LUA_TTABLE)
           && luaL_getmetafield(L, idx, "__index") != LUA_TNIL) {
    lua_pop(L, 1);  /* obj:getfd() */
    *why = "not an fd (no getfd method)";
    if (lua_getfield(L, idx, "getfd") != LUA_TFUNCTION) {
      lua_pop(L, 1);
      return -1;
    }
    lua_pushvalue(L, idx);
    lua_call(L, 1, 1);
    fd = (int)luaL_optinteger(L, -1, -1);
    lua_pop(L, 1);
    *why = "closed";
  }
  else
    *why = "not an fd, a connection, a socket or a file";
  return fd;
}


int pf_tofd (lua_State *L, int idx) {
  const char *why;
  int fd = testfd(L, lua_absindex(L, idx), &why);
  if (fd < 0) luaL_argerror(L, idx, why);
  return fd;
}


/* the fd of the item i of the list at idx (argument arg); raises naming
** the item */
int pf_tofdin (lua_State *L, int idx, int i, int arg) {
  const char *why;
  int fd;
  lua_geti(L, idx, i);
  fd = testfd(L, lua_gettop(L), &why);
  lua_pop(L, 1);
  if (fd < 0)
    luaL_argerror(L, arg, lua_pushfstring(L, "item %d: %s", i, why));
  return fd;
}



static int wait_fd_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return pf_pushwait(L, pf_wakereason(L));
}


/* prefork.wait_fd(fd, "r"|"w"|"rw" [, timeout [, idle]]) -> true |
** nil, "timeout" | nil, "stopping" (an idle wait, as a graceful stop
** ends an idle connection's read); yields in a task */
static int l_wait_fd (lua_State *L) {
  static const char *const modes[] = {"r", "w", "rw", NULL};
  static const int events[] = {POLLIN, POLLOUT, POLLIN | POLLOUT};
  int fd = pf_tofd(L, 1);
  int mode = luaL_checkoption(L, 2, "r", modes);
  lua_Number t = luaL_optnumber(L, 3, -1);
  int idle = lua_toboolean(L, 4) ? PF_WAITIDLE : 0;
  return pf_pushwait(L, pf_waitk(L, fd, events[mode], pf_deadline(t), idle,
                                 0, wait_fd_k));
}

/* }====================================================== */


void pf_open_conn (lua_State *L) {
  static const luaL_Reg meth[] = {
    {"read", c_read}, {"write", c_write}, {"close", c_close},
    {"settimeout", c_settimeout}, {"setmaxline", c_setmaxline},
    {"getfd", c_getfd}, {"peer", c_peer}, {"detach", c_detach},
    {"pending", c_pending},
    {NULL, NULL}
  };
  static const luaL_Reg metameth[] = {
    {"__gc", c_gc}, {"__close", c_gc}, {"__tostring", c_tostring},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"socketpair", l_socketpair},
    {"conn", l_conn},
    {"close", l_close},
    {"wait_fd", l_wait_fd},
    {NULL, NULL}
  };
  pf_newclass(L, PF_CONN, meth, metameth);
  luaL_setfuncs(L, funcs, 0);
  lua_newuserdatauv(L, 0, 0);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, freebufs);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, "prefork.conn.sparebufs");
}
