/*
** serve.c: the event loop inside a worker. worker:serve(handler) runs
** handler(conn) in a coroutine per connection on a libev loop of the
** worker's own; conn:read, conn:write, prefork.sleep and prefork.wait_fd
** yield there instead of blocking, and the loop resumes each coroutine
** when its fd is ready or its time is up.
**
** Accepting: each worker watches the listeners through an epoll set of
** its own, made with EPOLLEXCLUSIVE, so that a connection wakes one
** worker, not all (no thundering herd); libev watches that set's fd.
**
** Stopping: when TERM comes, the worker stops accepting and closes its
** listeners; connections that are idle (an answer went out, nothing came
** since) see read return nil, "stopping"; the others finish their
** request. The worker's serve returns when no coroutine is left (the
** master sends KILL after graceful_timeout).
*/

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>

#include <ev.h>

#include "prefork.h"


/* connections accepted at most per wake-up, so one busy listener does
** not starve the coroutines already running */
#define ACCEPTBATCH	64


typedef struct task {
  struct task *next, *prev;
  lua_State *co;
  int coref;  /* registry refs: the coroutine, its connection */
  int connref;
  int reason;  /* how its last wait ended: PF_READY, ... */
  int idle;  /* waiting to read on an idle connection */
  ev_io io;
  ev_timer timer;
} task;


static struct {
  struct ev_loop *loop;
  lua_State *L;  /* the thread that called serve */
  int handler;  /* registry ref */
  ev_io *acc;  /* a watcher for each listener */
  int nacc;
  int exclusive;  /* the entries are made exclusive (see flip) */
  int ep;  /* libev's epoll set, once found; -1 */
  double lastflip;
  int stopping;
  int running;
  task *tasks;  /* every live coroutine */
  task *pool;  /* finished ones kept for the next connections */
  int npool;
  ev_io wake;  /* the worker's stop pipe */
} sv;  /* all zero: not running */


static const char TASKS = 't';  /* registry key: coroutine -> its task */


/* the task of coroutine L, NULL when L is not a serve coroutine */
static task *findtask (lua_State *L) {
  task *t;
  if (!sv.running) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS);
  lua_rawgetp(L, -1, L);
  t = (task *)lua_touserdata(L, -1);
  lua_pop(L, 2);
  return t;
}


static void finish (task *t, int reusable);

/* coroutines kept for reuse at most */
#define POOLMAX	256


/* resume t's coroutine; when it ends (or fails) the task goes */
static void resume (task *t, int nargs) {
  lua_State *co = t->co;
  int nres, st = lua_resume(co, sv.L, nargs, &nres);
  if (st == LUA_YIELD) {
    lua_pop(co, nres);
    if (ev_is_active(&t->io) || ev_is_active(&t->timer)) return;
    pf_log(sv.L, "error", "worker %ld: a handler yielded outside a wait "
           "of prefork; its connection is closed", (long)getpid());
  }
  else if (st != LUA_OK) {
    luaL_traceback(sv.L, co, lua_tostring(co, -1), 0);
    pf_log(sv.L, "error", "worker %ld: handler failed: %s", (long)getpid(),
           lua_tostring(sv.L, -1));
    lua_pop(sv.L, 1);
  }
  finish(t, st == LUA_OK);
}


static void onio (struct ev_loop *loop, ev_io *io, int revents) {
  task *t = (task *)io->data;
  (void)revents;
  ev_io_stop(loop, io);
  ev_timer_stop(loop, &t->timer);
  t->reason = PF_READY;
  t->idle = 0;
  resume(t, 0);
}


static void ontimer (struct ev_loop *loop, ev_timer *tm, int revents) {
  task *t = (task *)tm->data;
  (void)revents;
  ev_io_stop(loop, &t->io);
  t->reason = t->io.fd >= 0 ? PF_TIMEOUT : PF_READY;  /* a sleep is done */
  t->idle = 0;
  resume(t, 0);
}


/*
** Wait until fd is ready for events or the deadline passes (idle: the
** wait is for a new request on an idle connection). In a serve coroutine
** it yields, and k(ctx) continues when the loop resumes it (with
** pf_wakereason telling how the wait ended); elsewhere it blocks in
** poll. Returns PF_READY, PF_TIMEOUT or PF_STOPPING.
*/
int pf_waitk (lua_State *L, int fd, int events, double deadline, int idle,
              lua_KContext ctx, lua_KFunction k) {
  task *t = findtask(L);
  if (t == NULL || !lua_isyieldable(L)) {
    if (fd < 0) {  /* a plain sleep */
      double left = deadline - pf_now();
      struct timespec ts;
      if (left > 0) {
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
      }
      return PF_READY;
    }
    return pf_waitfd(fd, events, deadline) ? PF_READY : PF_TIMEOUT;
  }
  if (idle && sv.stopping) return PF_STOPPING;
  t->idle = idle;
  ev_io_set(&t->io, fd, (events & POLLIN ? EV_READ : 0)
                        | (events & POLLOUT ? EV_WRITE : 0));
  if (fd >= 0) ev_io_start(sv.loop, &t->io);
  if (deadline >= 0) {
    double left = deadline - pf_now();
    ev_now_update(sv.loop);
    ev_timer_set(&t->timer, left > 0 ? left : 0, 0);
    ev_timer_start(sv.loop, &t->timer);
  }
  return lua_yieldk(L, 0, ctx, k);
}


/* is L a serve coroutine that can wait by yielding? */
int pf_intask (lua_State *L) {
  return lua_isyieldable(L) && findtask(L) != NULL;
}


int pf_wakereason (lua_State *L) {
  task *t = findtask(L);
  return t != NULL ? t->reason : PF_READY;
}


/* {======================================================
** Coroutines
** ======================================================= */

/* a coroutine for the connection on top of sv.L's stack (popped) */
/* a task with its coroutine: from the pool, or new */
static task *newtask (void) {
  lua_State *L = sv.L;
  task *t = sv.pool;
  if (t != NULL) {
    sv.pool = t->next;
    sv.npool--;
  }
  else {
    t = (task *)calloc(1, sizeof(task));
    if (t == NULL) return NULL;
    t->co = lua_newthread(L);
    t->coref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS);
    lua_pushlightuserdata(L, t);
    lua_rawsetp(L, -2, t->co);
    lua_pop(L, 1);
    ev_init(&t->io, onio);
    ev_init(&t->timer, ontimer);
    t->io.data = t->timer.data = t;
  }
  t->io.fd = -1;
  t->reason = PF_READY;
  t->idle = 0;
  t->prev = NULL;
  return t;
}


static void freetask (task *t) {
  lua_State *L = sv.L;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS);
  lua_pushnil(L);
  lua_rawsetp(L, -2, t->co);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, t->coref);
  free(t);
}


/* a live task for the connection (or nil) on top of sv.L's stack
** (popped); NULL when there is no memory */
static task *addtask (void) {
  task *t = newtask();
  if (t == NULL) {
    lua_pop(sv.L, 1);
    return NULL;
  }
  t->connref = luaL_ref(sv.L, LUA_REGISTRYINDEX);
  t->next = sv.tasks;
  if (sv.tasks) sv.tasks->prev = t;
  sv.tasks = t;
  return t;
}


static void start (void) {
  task *t = addtask();
  lua_State *co;
  if (t == NULL) return;  /* no memory: the connection goes */
  co = t->co;
  lua_rawgeti(co, LUA_REGISTRYINDEX, sv.handler);
  lua_rawgeti(co, LUA_REGISTRYINDEX, t->connref);
  resume(t, 1);
}


/* the coroutine ended: its connection is closed; the task goes, or waits
** in the pool when its coroutine ended well (it can run a new function) */
static void finish (task *t, int reusable) {
  lua_State *L = sv.L;
  ev_io_stop(sv.loop, &t->io);
  ev_timer_stop(sv.loop, &t->timer);
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->connref);
  if (luaL_callmeta(L, -1, "__close")) lua_pop(L, 1);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, t->connref);
  if (t->prev) t->prev->next = t->next;
  else sv.tasks = t->next;
  if (t->next) t->next->prev = t->prev;
  if (reusable && sv.npool < POOLMAX && lua_status(t->co) == LUA_OK
      && lua_gettop(t->co) == 0) {
    t->next = sv.pool;
    sv.pool = t;
    sv.npool++;
  }
  else
    freetask(t);
  if (sv.stopping && sv.tasks == NULL) ev_break(sv.loop, EVBREAK_ALL);
}

/* }====================================================== */


/* {======================================================
** The loop
** ======================================================= */

static void flip (void);

static void onaccept (struct ev_loop *loop, ev_io *io, int revents) {
  int n;
  (void)io; (void)revents;
  for (n = 0; n < ACCEPTBATCH && !sv.stopping; n++) {
    pf_conn *c = pf_newconn(sv.L);
    int st = pf_worker_accept(c);
    if (st <= 0) {
      lua_pop(sv.L, 1);
      if (st < 0)
        pf_log(sv.L, "error", "worker %ld: accept: %s", (long)getpid(),
               strerror(errno));
      else if (n == 0 && sv.exclusive && ev_now(loop) - sv.lastflip >= 1)
        flip();  /* woken for nothing: are the entries still exclusive? */
      break;
    }
    start();
  }
}


static void stopaccepting (void);

static void stopserving (void) {
  task *t, *next;
  if (pf_worker_drains()) {  /* take what waits for this worker alone */
    int k = 0;
    while (k++ < 4096) {
      pf_conn *c = pf_newconn(sv.L);
      if (pf_worker_accept(c) <= 0) {
        lua_pop(sv.L, 1);
        break;
      }
      start();
    }
  }
  sv.stopping = 1;
  stopaccepting();
  ev_io_stop(sv.loop, &sv.wake);
  pf_worker_stoplistening();
  for (t = sv.tasks; t != NULL; t = next) {  /* idle ones: "stopping" */
    next = t->next;
    if (t->idle) {
      ev_io_stop(sv.loop, &t->io);
      ev_timer_stop(sv.loop, &t->timer);
      t->reason = PF_STOPPING;
      t->idle = 0;
      resume(t, 0);
    }
  }
  if (sv.tasks == NULL) ev_break(sv.loop, EVBREAK_ALL);
}


static void onwake (struct ev_loop *loop, ev_io *io, int revents) {
  (void)loop; (void)io; (void)revents;
  if (pf_worker_stopping()) stopserving();
}


/* {------------------------------------------------------
** Exclusive wake-ups. Each listener has a watcher of its own in the loop;
** for the shared sockets (strategies "shared" and "mutex"), its entry in
** libev's epoll set is then made EPOLLEXCLUSIVE, so that a connection
** wakes one idle worker. (In a set of their own, watched by the loop's,
** EPOLLEXCLUSIVE wakes every worker: the kernel counts an exclusive
** wake-up only for a task that sleeps on that very set.) libev has no
** flag for it: flip() finds libev's set, the one epoll set here whose
** entries for the wake pipe and every listener carry libev's data (the
** fd, and a generation above it), read from /proc/self/fdinfo, and adds
** each listener again, exclusive, with the same data. libev leaves such
** an entry alone while its watcher stays started, but rebuilds its whole
** set after some errors (plain entries again): a wake-up that finds no
** connection flips again, at most once a second. Where a step fails the
** entries stay as libev made them: a herd, but correct.
** ------------------------------------------------------- */

#define EXCLUSIVEBIT	0x10000000u  /* EPOLLEXCLUSIVE, as fdinfo shows it */

/* fd's entry in the set of fdinfo file f: 1 with *data, *events */
static int findentry (FILE *f, int fd, uint64_t *data, unsigned *events) {
  char line[256];
  rewind(f);
  while (fgets(line, sizeof(line), f) != NULL) {
    int tfd;
    unsigned ev;
    unsigned long long d;
    if (sscanf(line, "tfd: %d events: %x data: %llx", &tfd, &ev, &d) == 3
        && tfd == fd && (uint32_t)d == (uint32_t)fd && (d >> 32) != 0) {
      *data = (uint64_t)d;
      *events = ev;
      return 1;
    }
  }
  return 0;
}


static void flip (void) {
  DIR *d = opendir("/proc/self/fdinfo");
  struct dirent *e;
  sv.lastflip = ev_now(sv.loop);
  if (d == NULL) return;
  while ((e = readdir(d)) != NULL) {
    char path[64];
    FILE *f;
    int ep = atoi(e->d_name), i, all;
    uint64_t data;
    unsigned events;
    if (e->d_name[0] == '.' || ep == dirfd(d)) continue;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", ep);
    if ((f = fopen(path, "re")) == NULL) continue;
    all = findentry(f, sv.wake.fd, &data, &events);
    for (i = 0; all && i < sv.nacc; i++)
      all = findentry(f, sv.acc[i].fd, &data, &events);
    for (i = 0; all && i < sv.nacc; i++) {  /* libev's set: flip */
      struct epoll_event ev;
      if (!findentry(f, sv.acc[i].fd, &data, &events)
          || (events & EXCLUSIVEBIT))
        continue;
      memset(&ev, 0, sizeof(ev));
      ev.events = EPOLLIN | EPOLLEXCLUSIVE;
      ev.data.u64 = data;
      if (epoll_ctl(ep, EPOLL_CTL_DEL, sv.acc[i].fd, NULL) == 0
          && epoll_ctl(ep, EPOLL_CTL_ADD, sv.acc[i].fd, &ev) != 0) {
        ev.events = EPOLLIN;  /* as libev had it */
        (void)epoll_ctl(ep, EPOLL_CTL_ADD, sv.acc[i].fd, &ev);
      }
    }
    fclose(f);
    if (all) {
      sv.ep = ep;
      break;
    }
  }
  closedir(d);
}


/* a watcher for each listener (fds[0..n-1]; fds[n] is the wake pipe),
** exclusive where that helps; 0 without memory */
static int watchlisteners (const struct pollfd *fds, int n) {
  int i;
  sv.acc = (ev_io *)calloc((size_t)n, sizeof(ev_io));
  if (sv.acc == NULL) return 0;
  for (i = 0; i < n; i++) {
    ev_io_init(&sv.acc[i], onaccept, fds[i].fd, EV_READ);
    ev_io_start(sv.loop, &sv.acc[i]);
  }
  sv.nacc = n;
  sv.exclusive = !pf_worker_drains()  /* (not a socket of its own) */
                 && ev_backend(sv.loop) == EVBACKEND_EPOLL;
  if (sv.exclusive) {
    ev_run(sv.loop, EVRUN_NOWAIT);  /* libev adds the entries */
    if (!sv.stopping) flip();
  }
  return 1;
}


/* stop watching the listeners (before they are closed: libev's lazy
** removal would leave the entries of sockets that stay open elsewhere) */
static void stopaccepting (void) {
  int i;
  for (i = 0; i < sv.nacc; i++) {
    if (sv.ep >= 0)
      (void)epoll_ctl(sv.ep, EPOLL_CTL_DEL, sv.acc[i].fd, NULL);
    ev_io_stop(sv.loop, &sv.acc[i]);
  }
  sv.nacc = 0;
}

/* }------------------------------------------------------ */


/* after serve or run: the kept coroutines, the loop, the handler go */
static void endloop (void) {
  sv.running = 0;
  while (sv.pool != NULL) {
    task *t = sv.pool;
    sv.pool = t->next;
    freetask(t);
  }
  sv.npool = 0;
  free(sv.acc);
  sv.acc = NULL;
  sv.nacc = 0;
  sv.ep = -1;
  ev_loop_destroy(sv.loop);
  sv.loop = NULL;
  if (sv.handler != LUA_NOREF) luaL_unref(sv.L, LUA_REGISTRYINDEX, sv.handler);
  sv.handler = LUA_NOREF;
}


/*
** worker:serve(handler): run handler(conn) in a coroutine for each
** connection, until a graceful stop has seen every one end. Returns true.
*/
static int l_serve (lua_State *L) {
  int n;
  const struct pollfd *fds = pf_worker_fds(&n);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (fds == NULL)
    return luaL_error(L, "serve: not in a worker process");
  if (sv.running)
    return luaL_error(L, "serve: a worker serves once at a time");
  sv.loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (sv.loop == NULL)
    return luaL_error(L, "serve: libev cannot make a loop");
  sv.ep = -1;
  sv.nacc = 0;
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &TASKS);
  lua_pushvalue(L, 2);
  sv.handler = luaL_ref(L, LUA_REGISTRYINDEX);
  sv.L = L;
  sv.running = 1;
  sv.stopping = 0;
  ev_io_init(&sv.wake, onwake, fds[n].fd, EV_READ);
  ev_io_start(sv.loop, &sv.wake);
  pf_worker_ready();
  if (pf_worker_stopping()) stopserving();
  else if (!watchlisteners(fds, n)) {
    endloop();
    return luaL_error(L, "not enough memory");
  }
  if (!sv.stopping || sv.tasks != NULL) ev_run(sv.loop, 0);
  endloop();
  lua_pushboolean(L, 1);
  return 1;
}

/*
** core.run(fn): run fn() in a coroutine on a loop of its own, with no
** listeners, until it and every coroutine it started with core.go have
** ended (the async pool worker). Returns true.
*/
static int l_run (lua_State *L) {
  task *t;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (sv.running)
    return luaL_error(L, "run: a loop runs already");
  sv.loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (sv.loop == NULL)
    return luaL_error(L, "run: libev cannot make a loop");
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &TASKS);
  sv.ep = -1;
  sv.nacc = 0;
  sv.handler = LUA_NOREF;
  sv.L = L;
  sv.running = 1;
  sv.stopping = 0;
  lua_pushvalue(L, 1);
  lua_pushnil(L);  /* no connection */
  if ((t = addtask()) == NULL) {
    lua_pop(L, 1);
    endloop();
    return luaL_error(L, "not enough memory");
  }
  lua_xmove(L, t->co, 1);
  resume(t, 0);
  if (sv.tasks != NULL) ev_run(sv.loop, 0);
  endloop();
  lua_pushboolean(L, 1);
  return 1;
}


/* core.go(fn): while a loop of serve or run goes, run fn() in a new
** coroutine of its own, from the loop's next turn */
static int l_go (lua_State *L) {
  task *t;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (!sv.running)
    return luaL_error(L, "go: only inside worker:serve or a pool worker");
  lua_settop(L, 1);
  lua_xmove(L, sv.L, 1);
  lua_pushnil(sv.L);
  if ((t = addtask()) == NULL) {
    lua_pop(sv.L, 1);
    return luaL_error(L, "not enough memory");
  }
  lua_xmove(sv.L, t->co, 1);
  ev_timer_set(&t->timer, 0., 0.);
  ev_timer_start(sv.loop, &t->timer);
  lua_pushboolean(L, 1);
  return 1;
}


/* in a new child (a pool's template): the copy of a running serve loop
** goes, with its fds */
void pf_serve_forget (void) {
  if (!sv.running) return;
  ev_loop_destroy(sv.loop);
  free(sv.acc);
  memset(&sv, 0, sizeof(sv));
  sv.ep = -1;
}

/* }====================================================== */


/* {======================================================
** Waits for Lua code
** ======================================================= */

static int done_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  if (pf_wakereason(L) == PF_TIMEOUT) {
    luaL_pushfail(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}


/* prefork.sleep(seconds) -> true; yields in a serve coroutine */
static int l_sleep (lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0, 1, "negative time");
  pf_waitk(L, -1, 0, pf_now() + s, 0, 0, done_k);
  return done_k(L, LUA_OK, 0);
}


/* prefork.wait_fd(fd, "r"|"w" [, timeout]) -> true | nil, "timeout" */
static int l_wait_fd (lua_State *L) {
  static const char *const modes[] = {"r", "w", "rw", NULL};
  static const int events[] = {POLLIN, POLLOUT, POLLIN | POLLOUT};
  int fd = pf_tofd(L, 1);
  int mode = luaL_checkoption(L, 2, "r", modes);
  lua_Number t = luaL_optnumber(L, 3, -1);
  int w = pf_waitk(L, fd, events[mode], t < 0 ? -1 : pf_now() + t, 0, 0,
                   done_k);
  if (w == PF_TIMEOUT) {
    luaL_pushfail(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* }====================================================== */


void pf_open_serve (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"serve", l_serve},
    {"sleep", l_sleep},
    {"wait_fd", l_wait_fd},
    {"run", l_run},
    {"go", l_go},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
