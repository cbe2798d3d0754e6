/*
** master.c: the master's state machine on the libev default loop.
**
** Each worker process (or the wish for one, while it waits to be
** respawned) is one struct worker in a list. Its life:
**
**   PENDING --spawn--> STARTING --ready--> RUNNING
**      ^                  |                   |
**      +----respawn-------+-------exit--------+
**   any state --retire--> STOPPING --exit--> freed
**
** A worker is ready at its first accept (it says so on its readiness
** pipe) or after READYAFTER seconds alive. One that dies before it is
** ready is respawned with capped exponential backoff; one that dies
** later is respawned at once. A replacement (on reload) is started
** first, and the worker it replaces is retired when it is ready.
**
** Lua decides (the front computes which contexts run); this file does:
** it forks, reaps, times, signals and logs. Every function that may call
** Lua takes the thread to call it on (L): the loop's own (m->L) in libev
** callbacks, the caller's in a method. Calls into Lua happen last in each
** callback, through pf_pcall, and nothing touches a worker after one
** unless the worker is held.
*/

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "table.h"


static const char *const statenames[] =
  {"starting", "starting", "running", "stopping"};

/* the signals the master takes, in the order of master.sig[] */
static const int msigs[] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU};
#define NSIGS	((int)(sizeof(msigs) / sizeof(msigs[0])))

/* the master running in this process: there is one default loop */
static master *runningmaster = NULL;


/* {======================================================
** libev callbacks
** ======================================================= */

/* w is ready: it takes connections, and what it replaces drains; last,
** the log line (Lua: it may change the list) */
static void becameready (lua_State *L, master *m, worker *w) {
  worker *old = w->replaces;
  w->state = W_RUNNING;
  w->fails = 0;
  ev_timer_stop(EV_DEFAULT, &w->timer);
  if (m->strategy == PF_ACCEPT_MASTER && w->ctl >= 0 && w->respawn
      && pf_handoff_add(m->handoff, w->ctl, &m->score[w->slot].accepted,
                        &m->score[w->slot].inflight))
    w->target = 1;
  w->replaces = NULL;
  if (old != NULL) pf_retire(L, m, old, SIGTERM);
  pf_log(L, "info", "worker %s (pid %ld) ready", w->name, (long)w->pid);
}


static void ontimer (struct ev_loop *loop, ev_timer *t, int revents) {
  worker *w = (worker *)t->data;
  master *m = w->m;
  (void)loop; (void)revents;
  switch (w->state) {
    case W_PENDING: pf_spawn(m->L, m, w); break;
    case W_STARTING: becameready(m->L, m, w); break;
    case W_STOPPING:
      pf_log(m->L, "warn", "worker %s (pid %ld) still running after "
             "%.3gs: KILL", w->name, (long)w->pid, m->graceful);
      kill(w->pid, SIGKILL);
      break;
    default: break;
  }
}


static void closectl (master *m, worker *w) {
  pf_untarget(m, w);
  if (w->ctl >= 0) {
    ev_io_stop(EV_DEFAULT, &w->ready);
    close(w->ctl);
    w->ctl = -1;
  }
}


static void onready (struct ev_loop *loop, ev_io *io, int revents) {
  worker *w = (worker *)io->data;
  master *m = w->m;
  char c;
  ssize_t n = read(w->ctl, &c, 1);
  (void)loop; (void)revents;
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n != 1 || m->strategy != PF_ACCEPT_MASTER)
    closectl(m, w);  /* one byte is all it says; the channel stays */
  if (n == 1 && w->state == W_STARTING) becameready(m->L, m, w);
}


/* "exit 1" or "signal KILL" */
static void fmtstatus (int status, char *buf, size_t size) {
  if (WIFSIGNALED(status)) {
    const char *name = pf_signame(WTERMSIG(status));
    if (name) snprintf(buf, size, "signal %s", name);
    else snprintf(buf, size, "signal %d", WTERMSIG(status));
  }
  else snprintf(buf, size, "exit %d", WEXITSTATUS(status));
}


/* on_exit(info): info = {id, pid, how, code, respawn_in} */
static void tellexit (lua_State *L, master *m, worker *w, pid_t pid,
                      int status, double delay) {
  if (!pf_pushcb(L, m, "on_exit")) return;
  lua_createtable(L, 0, 5);
  pf_pushctx(L, m, w);
  lua_getfield(L, -1, "id");
  lua_setfield(L, -3, "id");
  lua_pop(L, 1);
  lua_pushinteger(L, pid);
  lua_setfield(L, -2, "pid");
  pf_pushstatus(L, status);
  lua_setfield(L, -3, "code");
  lua_setfield(L, -2, "how");
  if (delay >= 0) {
    lua_pushnumber(L, delay);
    lua_setfield(L, -2, "respawn_in");
  }
  pf_callhook(L, "on_worker_exit", 1);
}


/* w's process is gone: the readiness it said, its slot, its pipe */
static void gone (master *m, worker *w) {
  if (w->state == W_STARTING && w->ctl >= 0) {  /* said ready, then died? */
    char c;  /* the writer is gone: this read cannot block */
    if (read(w->ctl, &c, 1) == 1) w->state = W_RUNNING;
  }
  closectl(m, w);
  ev_timer_stop(EV_DEFAULT, &w->timer);
  if (w->slot >= 0) m->used[w->slot] = 0;
  w->slot = -1;
  w->exits++;
}


static void exited (lua_State *L, master *m, worker *w, int status) {
  char how[32];
  pid_t pid = w->pid;
  double delay = -1;
  gone(m, w);
  fmtstatus(status, how, sizeof(how));
  w->hold = 1;  /* the log sink and the hook are Lua: they may retire w */
  if (w->respawn && !m->stopping) {
    int early = w->state != W_RUNNING;
    w->fails = early ? w->fails + 1 : 0;
    delay = early ? pf_backoff(w) : 0;
    pf_schedule(m, w, delay);
    pf_log(L, early ? "warn" : "info",
           "worker %s (pid %ld) exited: %s%s; respawn in %.3gs", w->name,
           (long)pid, how, early ? " before it was ready" : "", delay);
  }
  else {
    w->state = W_PENDING;
    w->pid = 0;
    pf_log(L, "info", "worker %s (pid %ld) stopped: %s", w->name,
           (long)pid, how);
  }
  tellexit(L, m, w, pid, status, delay);
  w->hold = 0;
  if (!w->respawn || m->stopping) pf_freeworker(L, m, w);
}


/* every child of the process: a worker's exit, or kept for prefork.wait */
static void onchild (struct ev_loop *loop, ev_child *c, int revents) {
  master *m = (master *)c->data;
  worker *w;
  (void)loop; (void)revents;
  for (w = m->list; w != NULL; w = w->next) {
    if (w->pid == c->rpid && w->state != W_PENDING) {
      exited(m->L, m, w, c->rstatus);
      return;
    }
  }
  pf_reaped(c->rpid, c->rstatus);
}


/* prefork.wait (in a hook) reaped pid: if a worker's, its exit is
** handled on the next loop iteration, out of the hook's way */
static int stolen (void *ud, pid_t pid, int status) {
  master *m = (master *)ud;
  worker *w;
  for (w = m->list; w != NULL; w = w->next) {
    if (w->pid == pid && w->state != W_PENDING && !w->stolen) {
      w->stolen = 1;
      w->status = status;
      ev_timer_start(EV_DEFAULT, &m->later);
      return 1;
    }
  }
  return 0;
}


static void onlater (struct ev_loop *loop, ev_timer *t, int revents) {
  master *m = (master *)t->data;
  worker *w;
  (void)loop; (void)revents;
  do {  /* exited() may change the list: look again after each */
    for (w = m->list; w != NULL && !w->stolen; w = w->next) {}
    if (w != NULL) {
      w->stolen = 0;
      exited(m->L, m, w, w->status);
    }
  } while (w != NULL);
}


/* the master's copies of the listeners: closed at a stop's start (the
** workers close theirs as they stop; a Unix socket's file goes now) */
static void closelisteners (lua_State *L, master *m) {
  int i, n;
  pf_pushlisteners(L, m);
  n = (int)luaL_len(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    pf_listener_close(pf_checklistener(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}


static void stop (lua_State *L, master *m, int how) {
  worker *w, *next;
  int n = 0;
  if (how <= m->stopping) return;
  m->stopping = how;
  for (w = m->list; w != NULL; w = w->next) n++;
  if (how == 1)
    pf_log(L, "info", "graceful stop: %d workers get up to %.3gs", n,
           m->graceful);
  else
    pf_log(L, "info", "immediate stop: %d workers get KILL", n);
  if (m->handoff != NULL) pf_handoff_pause(m->handoff);
  closelisteners(L, m);
  for (w = m->list; w != NULL; w = next) {
    next = w->next;
    pf_retire(L, m, w, how == 1 ? SIGTERM : SIGKILL);
  }
  if (m->list == NULL && m->running)
    ev_break(EV_DEFAULT, EVBREAK_ALL);
}


static void onsignal (struct ev_loop *loop, ev_signal *s, int revents) {
  master *m = (master *)s->data;
  lua_State *L = m->L;
  (void)loop; (void)revents;
  switch (s->signum) {
    case SIGTERM: stop(L, m, 1); break;
    case SIGINT: stop(L, m, m->stopping ? 2 : 1); break;  /* twice: now */
    case SIGQUIT: stop(L, m, 2); break;
    default:  /* HUP, TTIN, TTOU: the front's policy */
      if (!m->stopping && pf_pushcb(L, m, "on_signal")) {
        lua_pushstring(L, pf_signame(s->signum));
        pf_callhook(L, "on_signal", 1);
      }
  }
}

/* }====================================================== */


/* {======================================================
** Spawning
** ======================================================= */

/* in a new child (any fork while the master runs): drop the master's
** watchers, which libev keeps in process-wide tables, and its fds */
static void forget (void *ud) {
  master *m = (master *)ud;
  worker *w;
  int i;
  for (i = 0; i < NSIGS; i++) {
    ev_signal_stop(EV_DEFAULT, &m->sig[i]);
    if (m->saved[i].sa_handler == SIG_IGN)  /* nohup: stays ignored */
      sigaction(msigs[i], &m->saved[i], NULL);
  }
  ev_child_stop(EV_DEFAULT, &m->reaper);
  pf_onreap(NULL, NULL);
  runningmaster = NULL;
  for (w = m->list; w != NULL; w = w->next) {
    if (w->ctl >= 0) close(w->ctl);
    w->ctl = -1;
  }
  m->running = 0;
}


/* {======================================================
** Lua interface
** ======================================================= */

static master *checkmaster (lua_State *L) {
  master *m = (master *)luaL_checkudata(L, 1, PF_MASTER);
  if (m->pid != getpid())  /* a copy in a worker: its pids are not ours */
    luaL_error(L, "a master can only be used in its own process");
  return m;
}


/* the ids of a and b (contexts at those indices) are equal */
static int sameid (lua_State *L, int a, int b) {
  int eq;
  a = lua_absindex(L, a);
  b = lua_absindex(L, b);
  lua_getfield(L, a, "id");
  lua_getfield(L, b, "id");
  eq = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return eq;
}


/* the worker that currently serves the id of the context at idx */
static worker *current (lua_State *L, master *m, int idx) {
  worker *w;
  for (w = m->list; w != NULL; w = w->next) {
    int same;
    if (!w->respawn) continue;
    pf_pushctx(L, m, w);
    same = sameid(L, idx, -1);
    lua_pop(L, 1);
    if (same) return w;
  }
  return NULL;
}


/* the reuseport sockets for a worker of the id that old serves (NULL: a
** new id); may raise */
static int wantports (lua_State *L, master *m, worker *old) {
  int ref;
  if (m->strategy != PF_ACCEPT_REUSEPORT) return LUA_NOREF;
  if (old != NULL) return pf_ports_share(L, old->ports);
  pf_pushlisteners(L, m);
  ref = pf_ports_new(L, -1);
  lua_pop(L, 1);
  return ref;
}


/* a new worker for the context at index 2, at the list's tail: spawned
** and listed in the order wanted */
static worker *newworker (lua_State *L, master *m, int ports) {
  worker *w = (worker *)calloc(1, sizeof(worker)), **p;
  if (w == NULL) {
    pf_ports_release(L, ports);
    luaL_error(L, "not enough memory");
  }
  w->m = m;
  w->ports = ports;
  w->slot = w->ctl = -1;
  w->respawn = 1;
  lua_getfield(L, 2, "id");
  snprintf(w->name, sizeof(w->name), "%s", luaL_tolstring(L, -1, NULL));
  lua_pop(L, 2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->ctxs);
  lua_pushvalue(L, 2);
  w->ctx = luaL_ref(L, -2);
  lua_pop(L, 1);
  ev_init(&w->timer, ontimer);
  ev_init(&w->ready, onready);
  w->timer.data = w->ready.data = w;
  for (p = &m->list; *p != NULL; p = &(*p)->next) {}
  *p = w;
  return w;
}


/*
** m:want(context): a worker runs this context (a table with an id). If
** one runs another context under the same id, the new one replaces it:
** started first, the old one retired when the new one is ready.
*/
static int m_want (lua_State *L) {
  master *m = checkmaster(L);
  worker *w, *old;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, !m->stopping, 1, "master is stopping");
  old = current(L, m, 2);
  w = newworker(L, m, wantports(L, m, old));
  if (old != NULL) {
    w->exits = old->exits;
    w->replaces = old->replaces;  /* the one still serving, if any */
    old->replaces = NULL;
    if (old->state == W_RUNNING) w->replaces = old, old->respawn = 0;
    else pf_retire(L, m, old, SIGTERM);  /* not serving yet: no wait */
  }
  pf_schedule(m, w, 0);
  return 0;
}


/* m:drop(id): the workers of that id drain and go */
static int m_drop (lua_State *L) {
  master *m = checkmaster(L);
  worker *w, *next;
  lua_settop(L, 2);
  lua_createtable(L, 0, 1);  /* a context-shaped key: {id = id} */
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "id");
  for (w = m->list; w != NULL; w = next) {
    int same;
    next = w->next;
    pf_pushctx(L, m, w);
    same = sameid(L, 3, -1);
    lua_pop(L, 1);
    if (same) pf_retire(L, m, w, SIGTERM);
  }
  return 0;
}


/* m:stop([graceful]) */
static int m_stop (lua_State *L) {
  master *m = checkmaster(L);
  stop(L, m, lua_isnoneornil(L, 2) || lua_toboolean(L, 2) ? 1 : 2);
  return 0;
}


/* a counter of w's scoreboard slot, 0 without one */
#define scored(m, w, field) ((lua_Integer)((w)->slot < 0 ? 0 \
  : __atomic_load_n(&(m)->score[(w)->slot].field, __ATOMIC_RELAXED)))

/* the entry of m:workers() for w */
static void pushworker (lua_State *L, master *m, worker *w) {
  lua_createtable(L, 0, 8);
  pf_pushctx(L, m, w);
  lua_getfield(L, -1, "id");
  lua_setfield(L, -3, "id");
  lua_setfield(L, -2, "context");
  if (w->pid > 0) {
    lua_pushinteger(L, w->pid);
    lua_setfield(L, -2, "pid");
    lua_pushnumber(L, w->started);
    lua_setfield(L, -2, "started");
  }
  lua_pushstring(L, statenames[w->state]);
  lua_setfield(L, -2, "state");
  lua_pushinteger(L, w->exits);
  lua_setfield(L, -2, "exits");
  lua_pushinteger(L, scored(m, w, accepted));
  lua_setfield(L, -2, "accepted");
  lua_pushinteger(L, scored(m, w, inflight));
  lua_setfield(L, -2, "inflight");
}


/* m:workers() -> {{id, pid, state, started, exits, accepted, inflight}} */
static int m_workers (lua_State *L) {
  master *m = checkmaster(L);
  worker *w;
  int i = 0;
  lua_newtable(L);
  for (w = m->list; w != NULL; w = w->next) {
    pushworker(L, m, w);
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}


/* a worker wanted before run, not yet forked nor waiting for a retry */
static worker *unspawned (master *m) {
  worker *w;
  for (w = m->list; w != NULL; w = w->next)
    if (w->state == W_PENDING && !ev_is_active(&w->timer)) return w;
  return NULL;
}


static void startsignals (master *m) {
  int i;
  for (i = 0; i < NSIGS; i++) {
    sigaction(msigs[i], NULL, &m->saved[i]);
    ev_signal_init(&m->sig[i], onsignal, msigs[i]);
    m->sig[i].data = m;
    ev_signal_start(EV_DEFAULT, &m->sig[i]);
  }
  ev_child_init(&m->reaper, onchild, 0, 0);
  m->reaper.data = m;
  ev_child_start(EV_DEFAULT, &m->reaper);
  ev_timer_init(&m->later, onlater, 0, 0);
  m->later.data = m;
  pf_onreap(stolen, m);
}


static void stopsignals (master *m) {
  int i;
  pf_onreap(NULL, NULL);
  ev_timer_stop(EV_DEFAULT, &m->later);
  ev_child_stop(EV_DEFAULT, &m->reaper);
  for (i = 0; i < NSIGS; i++) {
    ev_signal_stop(EV_DEFAULT, &m->sig[i]);
    sigaction(msigs[i], &m->saved[i], NULL);
  }
}


/* what the strategy needs before the first fork: the lock file, or the
** hand-over; raises */
static void startstrategy (lua_State *L, master *m) {
  if (m->strategy == PF_ACCEPT_MUTEX && m->lockfd < 0
      && (m->lockfd = pf_accept_makelock()) < 0)
    luaL_error(L, "mutex: lock file: %s", strerror(errno));
  if (m->strategy == PF_ACCEPT_MASTER && m->handoff == NULL) {
    pf_pushlisteners(L, m);
    m->handoff = pf_handoff_new(L, lua_gettop(L));
    lua_pop(L, 1);
    if (m->handoff == NULL) luaL_error(L, "not enough memory");
  }
}


/* after the run: what startstrategy made goes */
static void endstrategy (master *m) {
  pf_handoff_free(m->handoff);
  m->handoff = NULL;
  if (m->lockfd >= 0) close(m->lockfd);
  m->lockfd = -1;
}


/*
** m:run(): fork the wanted workers, call opts.on_start, and run the loop
** until a stop has seen every worker exit. Returns true.
*/
static int m_run (lua_State *L) {
  master *m = checkmaster(L);
  worker *w;
  luaL_argcheck(L, !m->running, 1, "master is running already");
  if (runningmaster != NULL)
    return luaL_error(L, "another master runs in this process");
  startstrategy(L, m);
  if (pf_loop() == NULL)
    return luaL_error(L, "libev: cannot make the default loop");
  m->L = L;
  m->running = 1;
  runningmaster = m;
  startsignals(m);
  pf_onfork(forget, m);
  while ((w = unspawned(m)) != NULL)  /* a hook may change the list */
    pf_spawn(L, m, w);
  if (!m->stopping && pf_pushcb(L, m, "on_start"))
    pf_callhook(L, "on_start", 0);
  if (!m->stopping || m->list != NULL)
    ev_run(EV_DEFAULT, 0);
  m->running = 0;
  runningmaster = NULL;
  endstrategy(m);
  pf_onfork(NULL, NULL);
  stopsignals(m);
  pf_loop_close();
  pf_log(L, "info", "stopped");
  lua_pushboolean(L, 1);
  return 1;
}


static int m_gc (lua_State *L) {
  master *m = (master *)luaL_checkudata(L, 1, PF_MASTER);
  if (m->pid != getpid()) return 0;  /* a worker's copy */
  while (m->list != NULL) {
    worker *w = m->list;
    m->list = w->next;
    pf_ports_release(L, w->ports);
    free(w);
  }
  endstrategy(m);
  if (m->score != NULL) {
    munmap(m->score, sizeof(pf_score) * PF_MAXPROCS);
    m->score = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, m->opts);
  luaL_unref(L, LUA_REGISTRYINDEX, m->ctxs);
  m->opts = m->ctxs = LUA_NOREF;
  return 0;
}


/*
** core.master(opts) -> master | fail. opts: listeners (list),
** graceful_timeout, accept (the strategy), title, and the callbacks
** child(context) (in the new worker), before_fork(context),
** on_exit(info), on_signal(name), on_start().
*/
static int l_master (lua_State *L) {
  master *m;
  luaL_checktype(L, 1, LUA_TTABLE);
  m = (master *)lua_newuserdatauv(L, sizeof(master), 0);
  memset(m, 0, sizeof(*m));
  m->opts = m->ctxs = LUA_NOREF;
  m->lockfd = -1;
  m->pid = getpid();
  m->L = L;
  lua_getfield(L, 1, "graceful_timeout");
  m->graceful = luaL_optnumber(L, -1, 30);
  lua_getfield(L, 1, "accept");
  m->strategy = pf_checkstrategy(L, -1);
  lua_pop(L, 2);
  m->score = (pf_score *)mmap(NULL, sizeof(pf_score) * PF_MAXPROCS,
                              PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m->score == MAP_FAILED) {
    m->score = NULL;
    return pf_fail(L, "mmap");
  }
  luaL_setmetatable(L, PF_MASTER);
  lua_pushvalue(L, 1);
  m->opts = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  m->ctxs = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}


void pf_open_master (lua_State *L) {
  static const luaL_Reg meth[] = {
    {"run", m_run}, {"want", m_want}, {"drop", m_drop}, {"stop", m_stop},
    {"workers", m_workers},
    {NULL, NULL}
  };
  static const luaL_Reg metameth[] = {
    {"__gc", m_gc},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"master", l_master},
    {NULL, NULL}
  };
  pf_newclass(L, PF_MASTER, meth, metameth);
  luaL_setfuncs(L, funcs, 0);
}

/* }====================================================== */
