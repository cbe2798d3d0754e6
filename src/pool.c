/*
** pool.c: the C half of prefork.pool (the rest is src/prefork/pool.lua).
**
** A channel is a stream socket carrying frames, both ways:
**   u32 length (big-endian, of what follows), u8 kind, u32 id, data
** Writes are buffered and go out with flush (one write for many frames);
** recv reads what is there without blocking and hands each whole frame
** to a function. A frame longer than PF_MAXMSG is a corrupt channel.
**
** The template: a process forked when the pool is made, which ran the
** pool's require and eval. Asked over its control socket, it makes a
** worker with clone(CLONE_PARENT), so that the worker is a child of the
** pool's owner (who reaps it and learns how it died), and hands the
** owner the worker's end of a new channel with the worker's pid. It
** exits when the control socket closes (the pool closed), or at once
** when its owner dies.
**
** Each worker leads a process group of its own, with whatever it starts
** (os.execute, io.popen, prefork.fork). When the owner dies (even by
** kill -9) the kernel sends the worker PF_DEATHSIG (PR_SET_PDEATHSIG: the
** worker's parent is the owner's thread that made the pool), and its
** handler kills the whole group, however busy the worker is: spinning in
** Lua or blocked in a system call. A job's daemon that must outlive it
** leaves the group (setsid).
*/

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include "prefork.h"
#include "wire.h"


#if !defined(PF_MAXMSG)
#define PF_MAXMSG	(64u << 20)  /* bytes of one frame's data, at most */
#endif

#define HEAD	9  /* length, kind, id */

/* the signal a worker gets when its owner dies (a real-time one: no
** job expects it, and valgrind leaves it alone) */
#define PF_DEATHSIG	(SIGRTMIN + 4)
#define PF_CHAN	"prefork.chan"
#define PF_EPOLL	"prefork.epoll"


/* {======================================================
** Channels
** ======================================================= */

typedef struct buf {  /* bytes [r, w) of p[0, cap) are live */
  char *p;
  size_t cap, r, w;
} buf;

typedef struct chan {
  int fd;  /* -1 once closed */
  buf in, out;
} chan;


static chan *checkchan (lua_State *L, int idx) {
  chan *c = (chan *)luaL_checkudata(L, idx, PF_CHAN);
  if (c->fd < 0) luaL_error(L, "attempt to use a closed channel");
  return c;
}


/* room for n more bytes at the end of b [-0, +0, m] */
static char *room (lua_State *L, buf *b, size_t n) {
  if (b->r > 0 && b->r == b->w) b->r = b->w = 0;
  if (b->cap - b->w < n) {
    size_t live = b->w - b->r, cap = b->cap ? b->cap : 4096;
    if (b->r > 0) {  /* slide the live part down first */
      memmove(b->p, b->p + b->r, live);
      b->r = 0; b->w = live;
    }
    while (cap - live < n) {
      if (cap > ((size_t)-1) / 2) luaL_error(L, "not enough memory");
      cap *= 2;
    }
    if (cap != b->cap) {
      char *np = (char *)realloc(b->p, cap);
      if (np == NULL) luaL_error(L, "not enough memory");
      b->p = np; b->cap = cap;
    }
  }
  return b->p + b->w;
}


/* core.chan(fd | conn) -> a channel on fd, or on the connection's fd
** (taken over: the channel closes it; the connection is left closed) */
static int l_chan (lua_State *L) {
  static const int bufsize = 1 << 20;  /* a chunk of a map in one write */
  pf_conn *conn = (pf_conn *)luaL_testudata(L, 1, PF_CONN);
  int fd = conn ? conn->fd : (int)luaL_checkinteger(L, 1);
  chan *c;
  luaL_argcheck(L, fd >= 0, 1, "bad fd");
  c = (chan *)lua_newuserdatauv(L, sizeof(chan), 0);
  memset(c, 0, sizeof(chan));
  c->fd = -1;
  luaL_setmetatable(L, PF_CHAN);
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0
      || fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
    return pf_fail(L, "fcntl");
  if (conn) {  /* the fd is the channel's now */
    pf_fdclosed();
    conn->fd = -1;
  }
  c->fd = fd;
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof(bufsize));
  return 1;
}


/* ch:send(kind, id, data): one frame into the write buffer */
static int l_send (lua_State *L) {
  chan *c = checkchan(L, 1);
  lua_Integer kind = luaL_checkinteger(L, 2);
  lua_Integer id = luaL_checkinteger(L, 3);
  size_t n;
  const char *s = luaL_optlstring(L, 4, "", &n);
  unsigned char *p;
  luaL_argcheck(L, n <= PF_MAXMSG, 4, "message too large");
  p = (unsigned char *)room(L, &c->out, HEAD + n);
  pf_put32(p, (uint32_t)(n + 5));
  p[4] = (unsigned char)kind;
  pf_put32(p + 5, (uint32_t)id);
  memcpy(p + HEAD, s, n);
  c->out.w += HEAD + n;
  return 0;
}


/* ch:flush() -> true (all out) | false (the socket is full) | fail */
static int l_flush (lua_State *L) {
  chan *c = checkchan(L, 1);
  buf *b = &c->out;
  while (b->r < b->w) {
    ssize_t n = send(c->fd, b->p + b->r, b->w - b->r, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        lua_pushboolean(L, 0);
        return 1;
      }
      return pf_fail(L, "write");
    }
    b->r += (size_t)n;
  }
  b->r = b->w = 0;
  lua_pushboolean(L, 1);
  return 1;
}


/* ch:pending() -> bytes waiting to go out */
static int l_pending (lua_State *L) {
  chan *c = checkchan(L, 1);
  lua_pushinteger(L, (lua_Integer)(c->out.w - c->out.r));
  return 1;
}


/* read what the socket holds into the buffer, without blocking: 1 at
** its end, 0 else; -1 (errno set) on an error */
static int fill (lua_State *L, chan *c) {
  buf *b = &c->in;
  for (;;) {
    size_t want = 65536;
    char *p = room(L, b, want);
    ssize_t n = read(c->fd, p, b->cap - b->w);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (n < 0 && errno != ECONNRESET) return -1;
    if (n <= 0) return 1;
    b->w += (size_t)n;
    if ((size_t)n < want) return 0;  /* drained: spare the EAGAIN read */
  }
}


/* the values of a frame's data (a light userdata and its length): the
** protected part of hand */
static int decodeframe (lua_State *L) {
  const char *s = (const char *)lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  lua_settop(L, 0);
  return pf_decode(L, s, n);
}


/* call fn (at index 2) for the whole frame at h, then taken from b:
** fn(kind, id, data), or for a kind in mask (its bit set) fn(kind, id,
** true, values...) with the data decoded in place (no string made), or
** fn(kind, id, false, message) when it is corrupt */
static void hand (lua_State *L, buf *b, lua_Integer mask) {
  const unsigned char *h = (const unsigned char *)b->p + b->r;
  uint32_t len = pf_get32(h);
  int kind = h[4], top = lua_gettop(L);
  lua_pushvalue(L, 2);
  lua_pushinteger(L, kind);
  lua_pushinteger(L, (lua_Integer)pf_get32(h + 5));
  if (kind < 63 && ((mask >> kind) & 1)) {
    lua_pushboolean(L, 1);
    lua_pushcfunction(L, decodeframe);
    lua_pushlightuserdata(L, (void *)(uintptr_t)(h + HEAD));
    lua_pushinteger(L, (lua_Integer)len - 5);
    if (lua_pcall(L, 2, LUA_MULTRET, 0) != LUA_OK) {
      lua_pushboolean(L, 0);
      lua_replace(L, top + 4);
    }
  }
  else
    lua_pushlstring(L, (const char *)h + HEAD, len - 5);
  b->r += 4 + (size_t)len;
  lua_call(L, lua_gettop(L) - top - 1, 0);
}


/*
** ch:recv(fn [, mask]) -> true | nil, "closed" | nil, "corrupt message:
** ..." | fail. Reads what is there without blocking and calls fn for
** each whole frame (see hand; an error in fn goes through, the frame
** consumed). At the end of the stream the frames before it are handed
** over first; a partial frame there is "truncated".
*/
static int l_recv (lua_State *L) {
  chan *c = checkchan(L, 1);
  lua_Integer mask = luaL_optinteger(L, 3, 0);
  buf *b = &c->in;
  int eof;
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 3);
  if ((eof = fill(L, c)) < 0) return pf_fail(L, "read");
  while (b->w - b->r >= HEAD) {
    uint32_t len = pf_get32((const unsigned char *)b->p + b->r);
    if (len < 5 || len - 5 > PF_MAXMSG) {
      luaL_pushfail(L);
      lua_pushfstring(L, "corrupt message: a frame of %I bytes",
                      (lua_Integer)len);
      return 2;
    }
    if (b->w - b->r < 4 + (size_t)len) break;
    hand(L, b, mask);
    if (c->fd < 0) break;  /* fn closed it */
  }
  if (eof && c->fd >= 0) {
    luaL_pushfail(L);
    if (b->w > b->r) lua_pushliteral(L, "corrupt message: truncated");
    else lua_pushliteral(L, "closed");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}


/* ch:buffered([k]) -> true when k whole frames (default 1), or a bad
** header, wait in the read buffer: recv has them to hand over without
** reading */
static int l_buffered (lua_State *L) {
  chan *c = checkchan(L, 1);
  lua_Integer k = luaL_optinteger(L, 2, 1);
  buf *b = &c->in;
  size_t r = b->r;
  while (k > 0 && b->w - r >= HEAD) {
    uint32_t len = pf_get32((const unsigned char *)b->p + r);
    if (len < 5 || len - 5 > PF_MAXMSG) break;  /* bad: recv says so */
    if (b->w - r < 4 + (size_t)len) break;
    r += 4 + (size_t)len;
    k--;
  }
  lua_pushboolean(L, k <= 0 || (b->w - r >= HEAD
                   && (pf_get32((const unsigned char *)b->p + r) < 5
                       || pf_get32((const unsigned char *)b->p + r) - 5 > PF_MAXMSG)));
  return 1;
}


static int l_chanfd (lua_State *L) {
  lua_pushinteger(L, checkchan(L, 1)->fd);
  return 1;
}


static int l_chanclose (lua_State *L) {
  chan *c = (chan *)luaL_checkudata(L, 1, PF_CHAN);
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  free(c->in.p); free(c->out.p);
  memset(&c->in, 0, sizeof(buf));
  memset(&c->out, 0, sizeof(buf));
  return 0;
}

/* }====================================================== */


/* {======================================================
** An epoll set, for a pool's channels, with a kick: an eventfd in the
** set, written when a coroutine must look again (an answer it awaits
** was read by another)
** ======================================================= */

typedef struct epset {
  int ep, kick;  /* -1 once closed */
} epset;


static epset *checkep (lua_State *L) {
  epset *e = (epset *)luaL_checkudata(L, 1, PF_EPOLL);
  if (e->ep < 0) luaL_error(L, "attempt to use a closed epoll set");
  return e;
}


static int l_epoll (lua_State *L) {
  epset *e = (epset *)lua_newuserdatauv(L, sizeof(epset), 0);
  struct epoll_event ev;
  e->ep = e->kick = -1;
  luaL_setmetatable(L, PF_EPOLL);
  if ((e->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
    return pf_fail(L, "epoll");
  if ((e->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
    return pf_fail(L, "eventfd");
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN;
  ev.data.fd = e->kick;
  if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->kick, &ev) != 0)
    return pf_fail(L, "epoll_ctl");
  return 1;
}


/* ep:ctl("add"|"mod"|"del", fd, ["r"|"rw"]) -> true | fail */
static int l_epctl (lua_State *L) {
  static const char *const ops[] = {"add", "mod", "del", NULL};
  static const int opv[] = {EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL};
  static const char *const modes[] = {"r", "rw", NULL};
  epset *e = checkep(L);
  int op = luaL_checkoption(L, 2, NULL, ops);
  int fd = (int)luaL_checkinteger(L, 3);
  int mode = luaL_checkoption(L, 4, "r", modes);
  struct epoll_event ev;
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN | (mode ? EPOLLOUT : 0);
  ev.data.fd = fd;
  if (epoll_ctl(e->ep, opv[op], fd, &ev) != 0)
    return pf_fail(L, "epoll_ctl");
  lua_pushboolean(L, 1);
  return 1;
}


/* ep:kick(): wake whoever waits on the set */
static int l_epkick (lua_State *L) {
  epset *e = checkep(L);
  uint64_t one = 1;
  (void)!write(e->kick, &one, sizeof(one));
  return 0;
}


/* the fds of e ready now, pushed (a kick is taken, not pushed) */
static int ready (lua_State *L, epset *e, int ms) {
  struct epoll_event evs[64];
  int i, n, k = 0;
  do n = epoll_wait(e->ep, evs, 64, ms);
  while (n < 0 && errno == EINTR && ms == 0);
  if (n < 0 && errno == EINTR) n = 0;
  if (n < 0) return pf_fail(L, "epoll_wait");
  luaL_checkstack(L, n, "too many fds");
  for (i = 0; i < n; i++) {
    if (evs[i].data.fd == e->kick) {
      uint64_t v;
      (void)!read(e->kick, &v, sizeof(v));
    }
    else {
      lua_pushinteger(L, evs[i].data.fd);
      k++;
    }
  }
  return k;
}


static int wait_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return ready(L, checkep(L), 0);
}


/*
** ep:wait(timeout) -> fd, ... : the fds ready, after waiting at most
** timeout seconds for one (< 0: no limit; 0: no wait). In a serve
** coroutine the wait yields; elsewhere it blocks.
*/
static int l_epwait (lua_State *L) {
  epset *e = checkep(L);
  lua_Number t = luaL_optnumber(L, 2, 0);
  int n;
  lua_settop(L, 1);
  if (!(t >= 0)) t = -1;  /* negative or NaN: no limit */
  if (t == 0 || !pf_intask(L))
    return ready(L, e, t < 0 ? -1 : t > 2e6 ? 2000000000
                                   : (int)(t * 1e3 + 0.999));
  if ((n = ready(L, e, 0)) != 0) return n;
  pf_waitk(L, e->ep, POLLIN, t < 0 ? -1 : pf_now() + t, 0, 0, wait_k);
  return wait_k(L, LUA_OK, 0);
}


static int l_epclose (lua_State *L) {
  epset *e = (epset *)luaL_checkudata(L, 1, PF_EPOLL);
  if (e->ep >= 0) close(e->ep);
  if (e->kick >= 0) close(e->kick);
  e->ep = e->kick = -1;
  return 0;
}

/* }====================================================== */


/* {======================================================
** The template process
** ======================================================= */

/* read exactly n bytes (blocking): 1, 0 at EOF before them, -1 */
static int readexact (int fd, void *p, size_t n) {
  char *s = (char *)p;
  while (n > 0) {
    ssize_t r = read(fd, s, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r == 0 ? 0 : -1;
    s += r; n -= (size_t)r;
  }
  return 1;
}


/* send exactly n bytes (blocking, no SIGPIPE): 0, -1 */
static int sendexact (int fd, const void *p, size_t n) {
  const char *s = (const char *)p;
  while (n > 0) {
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    s += w; n -= (size_t)w;
  }
  return 0;
}


/* a pid and an fd in one message */
static int sendworker (int sock, pid_t pid, int fd) {
  int32_t p = (int32_t)pid;
  return pf_sendfdmsg(sock, fd, &p, sizeof(p), 0) == (ssize_t)sizeof(p) ? 0 : -1;
}


/* receive what sendworker sent (blocking): 1, 0 at EOF, -1, -2 when the
** template says making the worker failed (errno its errno) */
static int recvworker (int sock, pid_t *pid, int *fd) {
  int32_t p = 0;
  int trunc;
  ssize_t n = pf_recvfdmsg(sock, fd, &p, sizeof(p), MSG_WAITALL, &trunc);
  if (n <= 0) return (int)n;
  if (n == (ssize_t)sizeof(p) && p < 0 && *fd < 0) {  /* it failed */
    errno = (int)-p;
    return -2;
  }
  if (n != (ssize_t)sizeof(p) || *fd < 0 || trunc) {
    if (*fd >= 0) close(*fd);
    errno = EPROTO;
    return -1;
  }
  *pid = (pid_t)p;
  return 1;
}


/* the owner died: the worker's group goes (the worker with it) */
static void ownerdied (int sig) {
  (void)sig;
  kill(0, SIGKILL);
  _exit(1);
}


/* in a new worker: a process group of its own, ended when the owner dies
** (now or later) */
static void guard (pid_t owner) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = ownerdied;
  sigemptyset(&sa.sa_mask);
  setpgid(0, 0);
  sigaction(PF_DEATHSIG, &sa, NULL);
  if (prctl(PR_SET_PDEATHSIG, PF_DEATHSIG) != 0 || getppid() != owner)
    ownerdied(0);
}


/* in the template: make one worker, a child of the template's parent
** (owner), which runs main(fd) (the function on top of L's stack) and
** exits */
static void spawn (lua_State *L, int ctl, pid_t owner) {
  int sv[2];
  pid_t pid;
  int32_t en;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    en = -(int32_t)errno;  /* a negative pid, no fd: what failed */
    sendexact(ctl, &en, 4);
    return;
  }
  fflush(NULL);
  pid = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, NULL, NULL, NULL,
                       NULL);
  if (pid == 0) {
    guard(owner);
    close(ctl);
    close(sv[0]);
    lua_pushvalue(L, -1);
    lua_pushinteger(L, sv[1]);
    pf_child_run(L, 1);
  }
  en = -(int32_t)errno;
  close(sv[1]);
  if (pid < 0) sendexact(ctl, &en, 4);
  else if (sendworker(ctl, pid, sv[0]) != 0) kill(pid, SIGKILL);
  close(sv[0]);
}


/*
** In the new template: every socket, pipe and other kernel object (an
** epoll set, an eventfd) the owner had open becomes /dev/null, so that
** the owner's connections, listeners and other pools' channels end when
** the owner closes them, not when the pool's processes do. The fd
** numbers stay taken: a Lua object of the owner's copied here that
** closes its fd closes /dev/null, never a later fd of the same number.
** Files, terminals and directories stay.
*/
static void neutralise (int keep) {
  DIR *d = opendir("/proc/self/fd");
  int null = open("/dev/null", O_RDWR | O_CLOEXEC);
  struct dirent *de;
  if (d == NULL || null < 0) {
    if (d) closedir(d);
    if (null >= 0) close(null);
    return;
  }
  while ((de = readdir(d)) != NULL) {
    int fd = atoi(de->d_name);
    struct stat st;
    if (fd < 3 || fd == keep || fd == null || fd == dirfd(d)) continue;
    if (fstat(fd, &st) != 0) continue;
    if (S_ISREG(st.st_mode) || S_ISCHR(st.st_mode) || S_ISDIR(st.st_mode)
        || S_ISBLK(st.st_mode)) continue;
    dup2(null, fd);  /* not close-on-exec: as the fd was, near enough */
  }
  closedir(d);
  close(null);
}


/* the template's life: setup, say how it went, then make workers on
** request until the control socket closes */
static void PF_NORETURN templatelife (lua_State *L, int ctl, pid_t owner) {
  sigset_t none;
  char cmd;
  uint32_t len = 0;
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != owner)
    pf_exit(1);  /* the owner is gone already */
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  pf_settitle("prefork: pool template");
  neutralise(ctl);
  lua_pushvalue(L, 1);  /* setup */
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
    size_t n;
    const char *msg = lua_tolstring(L, -1, &n);
    if (msg == NULL) msg = "(no message)", n = strlen(msg);
    len = (uint32_t)n;
    sendexact(ctl, &len, 4);
    sendexact(ctl, msg, n);
    pf_exit(1);
  }
  sendexact(ctl, &len, 4);
  lua_settop(L, 2);  /* main on top */
  while (readexact(ctl, &cmd, 1) == 1)
    spawn(L, ctl, owner);
  pf_exit(0);
}


/*
** core.pool_template(setup, main) -> pid, ctl | nil, message
** Forks the template, which runs setup() and then makes workers that run
** main(fd) (fd: the worker's end of its channel). Fails with the
** template's error message when setup raised.
*/
static int l_template (lua_State *L) {
  int sv[2];
  pid_t pid, owner = getpid();
  uint32_t len;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return pf_fail(L, "socketpair");
  pid = pf_fork();
  if (pid < 0) {
    int en = errno;
    close(sv[0]); close(sv[1]);
    errno = en;
    return pf_fail(L, "fork");
  }
  if (pid == 0) {
    close(sv[0]);
    pf_serve_forget();
    templatelife(L, sv[1], owner);
  }
  close(sv[1]);
  if (readexact(sv[0], &len, 4) != 1) {
    close(sv[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    luaL_pushfail(L);
    lua_pushliteral(L, "the pool's template process died at start");
    return 2;
  }
  if (len > 0) {  /* its error message */
    char *msg = (char *)malloc(len);
    int ok = msg != NULL && readexact(sv[0], msg, len) == 1;
    close(sv[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    luaL_pushfail(L);
    if (ok) lua_pushlstring(L, msg, len);
    else lua_pushliteral(L, "the pool's template process failed");
    free(msg);
    return 2;
  }
  lua_pushinteger(L, pid);
  lua_pushinteger(L, sv[0]);
  return 2;
}


/* core.pool_spawn(ctl) -> fd, pid | fail: a new worker from the template */
static int l_spawn (lua_State *L) {
  int ctl = (int)luaL_checkinteger(L, 1);
  pid_t pid = 0;
  int fd, r;
  if (sendexact(ctl, "s", 1) != 0) return pf_fail(L, "pool template");
  r = recvworker(ctl, &pid, &fd);
  if (r == 0) {
    luaL_pushfail(L);
    lua_pushliteral(L, "pool template: gone");
    return 2;
  }
  if (r == -2) return pf_fail(L, "pool template: fork");
  if (r < 0) return pf_fail(L, "pool template");
  lua_pushinteger(L, fd);
  lua_pushinteger(L, pid);
  return 2;
}

/*
** core.pool_reap(pid, grace) -> "exit"|"signal", code | fail: the status
** of a pool worker whose channel ended, waiting up to grace seconds
** (without yielding: the caller is in the middle of its bookkeeping),
** then KILL. Fails ("wait: No child processes", ECHILD) when it is not,
** or no longer, a child of ours.
*/
static int l_reap (lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  double deadline = pf_now() + luaL_optnumber(L, 2, 1);
  int status = 0, killed = 0;
  luaL_argcheck(L, pid > 0, 1, "bad pid");
  for (;;) {
    pid_t got = pf_takereaped(pid, &status);
    if (got == 0) got = waitpid(pid, &status, killed ? 0 : WNOHANG);
    if (got == pid) return pf_pushstatus(L, status);
    if (got < 0 && errno != EINTR) return pf_fail(L, "wait");
    if (got == 0 && pf_now() >= deadline && !killed) {
      kill(pid, SIGKILL);
      killed = 1;
    }
    else if (got == 0) {
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
    }
  }
}

/* }====================================================== */


void pf_open_pool (lua_State *L) {
  static const luaL_Reg chanm[] = {
    {"send", l_send},
    {"flush", l_flush},
    {"pending", l_pending},
    {"recv", l_recv},
    {"buffered", l_buffered},
    {"fd", l_chanfd},
    {"close", l_chanclose},
    {"__gc", l_chanclose},
    {"__close", l_chanclose},
    {"__index", NULL},
    {NULL, NULL}
  };
  static const luaL_Reg epm[] = {
    {"ctl", l_epctl},
    {"wait", l_epwait},
    {"kick", l_epkick},
    {"close", l_epclose},
    {"__gc", l_epclose},
    {"__index", NULL},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"chan", l_chan},
    {"epoll", l_epoll},
    {"pool_template", l_template},
    {"pool_spawn", l_spawn},
    {"pool_reap", l_reap},
    {NULL, NULL}
  };
  luaL_newmetatable(L, PF_CHAN);
  luaL_setfuncs(L, chanm, 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  luaL_newmetatable(L, PF_EPOLL);
  luaL_setfuncs(L, epm, 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 2);
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, PF_MAXMSG);
  lua_setfield(L, -2, "pool_maxmsg");
}
