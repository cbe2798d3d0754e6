/*
** accept.c: the accept strategies, both sides of each.
**
**   shared     every worker accepts on the master's listeners; a
**              connection wakes one idle worker (EPOLLEXCLUSIVE)
**   mutex      the same, but a worker accepts only while it holds a lock
**              on a file the master made (flock): the accept mutex
**   reuseport  each worker id has SO_REUSEPORT sockets of its own, which
**              the master keeps across respawns: the kernel spreads the
**              connections
**   master     the master accepts and hands each connection (SCM_RIGHTS)
**              to the least loaded worker
**
** The worker's side takes one connection at a time (pf_accept_round);
** the master's side makes the lock file, keeps the reuseport sockets of
** each id, and does the hand-over.
*/

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/socket.h>

#include <ev.h>

#include "prefork.h"


static const char *const strategies[] = {
  "shared", "mutex", "reuseport", "master", NULL
};


/* the strategy named at idx (default "shared"): PF_ACCEPT_SHARED, ... */
int pf_checkstrategy (lua_State *L, int idx) {
  return luaL_checkoption(L, idx, "shared", strategies);
}


/* {======================================================
** The worker's side
** ======================================================= */

/* One process is at most one worker: its state is the process's. */
static struct {
  int mode;  /* PF_ACCEPT_SHARED, ... */
  pf_listener **ls;  /* the inherited listeners */
  int nls;
  int next;  /* listener to try first: none is starved */
  int ctl;  /* accept = "master": connections come on it */
  int lockfd;  /* accept = "mutex": the lock file, opened by this worker */
  int locked;  /* the lock is held */
  int drained;  /* connections taken after the stop began */
} self = {.mode = PF_ACCEPT_SHARED, .ctl = -1, .lockfd = -1};


/* the worker accepts from the listeners ls (n of them) or, with
** accept = "master", from the master over ctl (and the listeners go) */
void pf_accept_setup (pf_listener **ls, int n, int ctl, int mode) {
  int i;
  self.mode = mode;
  self.ls = ls;
  self.nls = n;
  self.ctl = ctl;
  if (mode == PF_ACCEPT_MASTER) {  /* the master accepts: they are none of ours */
    for (i = 0; i < n; i++) pf_listener_close(ls[i]);
    self.nls = 0;
  }
}


/* the fds a worker waits on for connections (the listeners, or the
** master's channel): their number, the fds into fds[] (room for n) */
int pf_accept_fds (int *fds) {
  int i;
  if (self.mode == PF_ACCEPT_MASTER) {
    fds[0] = self.ctl;
    return 1;
  }
  for (i = 0; i < self.nls; i++) fds[i] = pf_listener_fd(self.ls[i]);
  return self.nls;
}


/* accept(2) failures that concern one connection only (accept(2): on
** Linux pending network errors surface here and mean "try again") */
static int transient (int en) {
  switch (en) {
    case EAGAIN: case EINTR: case ECONNABORTED: case EPROTO:
    case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
    case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
      return 1;
    default:
      return 0;
  }
}


/* a connection the master handed over: 1 with c->fd set, 0 none there,
** -1 with errno; at the master's end the stop flag is set (*gone) */
static int fromchannel (pf_conn *c, int *gone) {
  int fd, n = pf_recvfd(self.ctl, &fd);
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
  if (n == 0) {  /* the master is gone: stop */
    *gone = 1;
    return 0;
  }
  if (fd < 0) return 0;  /* a byte without a connection: nothing to take */
  c->fd = fd;
  fcntl(fd, F_SETFL, O_NONBLOCK);
  return 1;
}


/* one round over the listeners: 1 with c->fd set, 0 none ready, -1 */
static int fromlisteners (pf_conn *c) {
  int k;
  for (k = 0; k < self.nls; k++) {
    int i = (self.next + k) % self.nls;
    int fd = accept4(pf_listener_fd(self.ls[i]), NULL, NULL,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      self.next = i + 1;
      c->fd = fd;
      return 1;
    }
    if (!transient(errno)) return -1;
  }
  return 0;
}


/* take one connection into c, never blocking: 1, 0 none there, -1 with
** errno. Under "mutex" a worker that does not hold the lock takes it for
** this round, or passes. *gone: the master is gone. */
int pf_accept_round (pf_conn *c, int *gone) {
  int st, trylock = self.mode == PF_ACCEPT_MUTEX && !self.locked;
  if (trylock && pf_accept_lock(0) != 0) return 0;
  st = self.mode == PF_ACCEPT_MASTER ? fromchannel(c, gone) : fromlisteners(c);
  if (trylock) pf_accept_unlock();
  return st;
}


/* accept = "mutex": take the lock (waiting for it, unless wait is 0; a
** signal ends the wait): 0 held, -1 not. Other strategies: 0. */
int pf_accept_lock (int wait) {
  if (self.mode != PF_ACCEPT_MUTEX || self.locked) return 0;
  if (flock(self.lockfd, LOCK_EX | (wait ? 0 : LOCK_NB)) != 0) return -1;
  self.locked = 1;
  return 0;
}


void pf_accept_unlock (void) {
  if (self.locked) flock(self.lockfd, LOCK_UN);
  self.locked = 0;
}


/* accept = "mutex": open the master's lock file again, through the copy
** of its fd this worker inherited, as an open file of its own (flock
** excludes between open files, not between copies of one); the copy goes */
int pf_accept_openlock (int inherited) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/self/fd/%d", inherited);
  self.lockfd = open(path, O_RDWR | O_CLOEXEC);
  close(inherited);
  return self.lockfd;
}


/* a stopping worker takes what waits for it alone: what the master
** handed over, or the queue of its own socket (a bounded number, for a
** socket that keeps filling) */
int pf_accept_drains (void) {
  return (self.mode == PF_ACCEPT_MASTER || self.mode == PF_ACCEPT_REUSEPORT)
         && self.drained < 4096;
}


void pf_accept_drained (void) {
  self.drained++;
}


/* the worker stops accepting: its listeners close */
void pf_accept_close (void) {
  int i;
  for (i = 0; i < self.nls; i++)
    pf_listener_close(self.ls[i]);
  self.nls = 0;
}


/* in a process the worker forks: no lock of the worker's to hold */
void pf_accept_forget (void) {
  if (self.lockfd >= 0) close(self.lockfd);
  self.lockfd = -1;
  self.locked = 0;
}

/* }====================================================== */


/* {======================================================
** The master's side: the lock file (accept = "mutex")
** ======================================================= */

/* the lock file: made in a fresh directory that only we may write (mode
** 0700), then unlinked with it: it lives on as an open file only, which
** nobody else can reach, swap or leave behind. Its fd, or -1. */
int pf_accept_makelock (void) {
  const char *base = getenv("XDG_RUNTIME_DIR");
  char dir[256], path[300];
  int fd, en;
  snprintf(dir, sizeof(dir), "%s/prefork-XXXXXX",
           base != NULL && base[0] == '/' ? base : "/tmp");
  if (mkdtemp(dir) == NULL) return -1;
  snprintf(path, sizeof(path), "%s/accept.lock", dir);
  fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  en = errno;
  unlink(path);
  rmdir(dir);
  errno = en;
  return fd;
}

/* }====================================================== */


/* {======================================================
** The master's side: the sockets of each id (accept = "reuseport")
**
** A worker id has a list of listeners: a SO_REUSEPORT sibling of each TCP
** template, the Unix ones shared. The list outlives the id's workers
** (respawns, replacements on reload share it), and its sockets close in
** the master when no worker holds it any more: the last worker drains
** their queue.
** ======================================================= */

static const char PORTS = 'p';  /* registry key: list -> its holders */


static void pushports (lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &PORTS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &PORTS);
  }
}


/* add d to the holders of the list on top; their number now */
static lua_Integer hold (lua_State *L, lua_Integer d) {
  lua_Integer n;
  pushports(L);
  lua_pushvalue(L, -2);
  lua_rawget(L, -2);
  n = lua_tointeger(L, -1) + d;  /* (none yet: nil, 0) */
  lua_pop(L, 1);
  lua_pushvalue(L, -2);
  if (n > 0) lua_pushinteger(L, n);
  else lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  return n;
}


/* close the siblings in the list at idx (not the shared Unix ones) */
static void closesiblings (lua_State *L, int idx) {
  int i, n = (int)luaL_len(L, idx);
  for (i = 1; i <= n; i++) {
    pf_listener *l;
    lua_rawgeti(L, idx, i);
    l = pf_checklistener(L, -1);
    if (pf_listener_sibling(l)) pf_listener_close(l);
    lua_pop(L, 1);
  }
}


/* a new list for an id, from the master's listeners (the list at idx);
** a registry ref that holds it. Raises when a socket cannot be bound. */
int pf_ports_new (lua_State *L, int idx) {
  int i, n = (int)luaL_len(L, idx);
  idx = lua_absindex(L, idx);
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    pf_listener *tpl;
    lua_rawgeti(L, idx, i);
    tpl = pf_checklistener(L, -1);
    if (pf_listener_template(tpl)) {
      if (pf_listener_clone(L, tpl) == NULL)
        return luaL_error(L, "reuseport: bind: %s", strerror(errno));
      lua_remove(L, -2);
    }
    lua_rawseti(L, -2, i);
  }
  hold(L, 1);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}


/* another holder of the list of ref: its own ref */
int pf_ports_share (lua_State *L, int ref) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  hold(L, 1);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}


/* a holder lets go (ref is freed); the last one closes the sockets */
void pf_ports_release (lua_State *L, int ref) {
  if (ref == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  if (hold(L, -1) <= 0) closesiblings(L, lua_gettop(L));
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
}


/* in a new worker: the siblings of every other list close (they are
** other ids'); its own list is pushed */
void pf_ports_only (lua_State *L, int ref) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  pushports(L);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    if (!lua_rawequal(L, -1, -3)) closesiblings(L, lua_gettop(L));
  }
  lua_pop(L, 1);
}

/* }====================================================== */


/* {======================================================
** The master's side: the hand-over (accept = "master")
**
** The master watches the listeners while some worker can take a
** connection; each connection goes to the least loaded target, a ready
** worker's channel: load is the connections it holds plus those handed
** over that it has not taken yet.
** ======================================================= */

typedef struct target {
  int fd;  /* the worker's channel */
  unsigned long sent;  /* connections handed over */
  const unsigned long *accepted;  /* the worker's counters (shared) */
  const long *inflight;
} target;

struct pf_handoff {
  ev_io *lw;  /* a watcher for each listener */
  int nlw;
  int on;  /* watching them */
  int paused;  /* not any more: the master stops */
  target *t;
  int nt, cap;
};


static unsigned long load (const target *t) {
  unsigned long taken = __atomic_load_n(t->accepted, __ATOMIC_RELAXED);
  long inflight = __atomic_load_n(t->inflight, __ATOMIC_RELAXED);
  return (inflight > 0 ? (unsigned long)inflight : 0)
         + (t->sent > taken ? t->sent - taken : 0);
}


/* the target with the least load, not in tried[] (n of them) */
static target *leastloaded (pf_handoff *h, target **tried, int n) {
  target *best = NULL;
  unsigned long bl = 0;
  int i, k;
  for (i = 0; i < h->nt; i++) {
    target *t = &h->t[i];
    int skip = 0;
    unsigned long l;
    for (k = 0; k < n && !skip; k++) skip = tried[k] == t;
    if (skip) continue;
    l = load(t);
    /* a tie goes to the one handed fewer so far: idle workers share */
    if (best == NULL || l < bl || (l == bl && t->sent < best->sent)) {
      best = t;
      bl = l;
    }
  }
  return best;
}


/* a new connection to the least loaded target that takes it; a worker
** that is busy (its channel full) or dying is passed over */
static void dispatch (pf_handoff *h, int fd) {
  target *tried[8];
  int n = 0;
  for (;;) {
    target *t = leastloaded(h, tried, n);
    if (t == NULL || n == 8) break;
    if (pf_sendfd(t->fd, fd)) {
      t->sent++;
      break;
    }
    tried[n++] = t;
  }
  close(fd);  /* the worker has its copy, or nobody could take it */
}


static void watch (pf_handoff *h, int on) {
  int i;
  on = on && !h->paused && h->nt > 0;
  if (on == h->on) return;
  for (i = 0; i < h->nlw; i++) {
    if (on) ev_io_start(EV_DEFAULT, &h->lw[i]);
    else ev_io_stop(EV_DEFAULT, &h->lw[i]);
  }
  h->on = on;
}


static void onlisten (struct ev_loop *loop, ev_io *io, int revents) {
  pf_handoff *h = (pf_handoff *)io->data;
  int i;
  (void)loop; (void)revents;
  for (i = 0; i < 64 && h->nt > 0; i++) {
    int fd = accept4(io->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return;  /* EAGAIN, or a connection that went */
    dispatch(h, fd);
  }
}


/* the hand-over for the listeners in the list at idx; NULL without
** memory */
pf_handoff *pf_handoff_new (lua_State *L, int idx) {
  int i, n = (int)luaL_len(L, idx);
  pf_handoff *h = (pf_handoff *)calloc(1, sizeof(pf_handoff));
  if (h == NULL || (h->lw = (ev_io *)calloc((size_t)n + 1,
                                            sizeof(ev_io))) == NULL) {
    free(h);
    return NULL;
  }
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, idx, i + 1);
    ev_io_init(&h->lw[i], onlisten, pf_listener_fd(pf_checklistener(L, -1)),
               EV_READ);
    h->lw[i].data = h;
    lua_pop(L, 1);
  }
  h->nlw = n;
  return h;
}


/* a ready worker's channel fd takes connections from now on; 0 without
** memory */
int pf_handoff_add (pf_handoff *h, int fd, const unsigned long *accepted,
                    const long *inflight) {
  target *t;
  if (h->nt == h->cap) {
    int cap = h->cap ? 2 * h->cap : 8;
    target *nt = (target *)realloc(h->t, (size_t)cap * sizeof(target));
    if (nt == NULL) return 0;
    h->t = nt;
    h->cap = cap;
  }
  t = &h->t[h->nt++];
  t->fd = fd;
  t->sent = 0;
  t->accepted = accepted;
  t->inflight = inflight;
  watch(h, 1);
  return 1;
}


/* the channel fd takes no more (its worker stops or died) */
void pf_handoff_remove (pf_handoff *h, int fd) {
  int i;
  for (i = 0; i < h->nt; i++) {
    if (h->t[i].fd == fd) {
      h->t[i] = h->t[--h->nt];
      break;
    }
  }
  if (h->nt == 0) watch(h, 0);
}


/* the master stops: no more connections are taken */
void pf_handoff_pause (pf_handoff *h) {
  watch(h, 0);
  h->paused = 1;
}


void pf_handoff_free (pf_handoff *h) {
  if (h == NULL) return;
  watch(h, 0);
  free(h->lw);
  free(h->t);
  free(h);
}

/* }====================================================== */
