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
** it forks, reaps, times, signals and logs. Calls into Lua happen last
** in each callback, through pf_pcall, and nothing touches a worker after
** one unless the worker is held.
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

#include <ev.h>

#include "prefork.h"


#define READYAFTER	1.0  /* seconds alive that make a worker ready */
#define BACKOFF0	0.1  /* first delay after a death before ready */
#define BACKOFFMAX	10.0  /* the cap of the doubling delay */

enum wstate { W_PENDING, W_STARTING, W_RUNNING, W_STOPPING };

static const char *const statenames[] =
  {"starting", "starting", "running", "stopping"};

/* the signals the master takes, in the order of master.sig[] */
static const int msigs[] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU};
#define NSIGS	((int)(sizeof(msigs) / sizeof(msigs[0])))


typedef struct master master;

typedef struct worker {
  struct worker *next;
  master *m;
  enum wstate state;
  pid_t pid;  /* 0 while pending */
  int ctx;  /* its context: a ref in the master's context table */
  int respawn;  /* replace it when it exits */
  int hold;  /* in a Lua call that may retire it: free it afterwards */
  int fails;  /* deaths before ready, in a row */
  int exits;  /* of this id, since the master started */
  int slot;  /* its scoreboard slot, -1 none */
  int ctl;  /* read end of its readiness pipe, -1 none */
  double started;
  struct worker *replaces;  /* retire that one when this one is ready */
  int stolen;  /* reaped by prefork.wait in a hook: status is its exit */
  int status;
  unsigned long sent;  /* connections handed over (accept = "master") */
  int ls;  /* its listeners (accept = "reuseport"): a ref to a list that
           ** the workers of its id share across respawns and reloads */
  char name[40];  /* its id, for the log */
  ev_timer timer;  /* spawn (PENDING), ready (STARTING), kill (STOPPING) */
  ev_io ready;  /* readiness pipe */
} worker;


struct master {
  lua_State *L;  /* the thread that runs the loop */
  worker *list;
  int stopping;  /* 0, 1 graceful, 2 immediate */
  int running;
  pid_t pid;
  int opts;  /* registry refs: the options (callbacks, listeners, ...) */
  int ctxs;  /* and the contexts of the workers */
  double graceful;  /* seconds a stopping worker gets before KILL */
  int channel;  /* accept = "master": the master accepts and hands over */
  int reuseport;  /* accept = "reuseport": a SO_REUSEPORT socket per id */
  int mutex;  /* accept = "mutex": the workers accept under a lock */
  int lockfd;  /* then: the lock file, already unlinked */
  int nlw;  /* then: its watchers of the listeners */
  ev_io *lw;
  pf_score *score;  /* PF_MAXPROCS slots shared with the workers */
  unsigned char used[PF_MAXPROCS];
  ev_signal sig[NSIGS];
  struct sigaction saved[NSIGS];  /* what the signals did before run */
  ev_child reaper;  /* every child of the process */
  ev_timer later;  /* handles the exits that prefork.wait took */
};


static void spawn (master *m, worker *w);

/* the master running in this process: there is one default loop */
static master *runningmaster = NULL;


/* {======================================================
** Calls into Lua
** ======================================================= */

/* push opts[name] if it is a function [-0, +(0|1), -] */
static int pushcb (master *m, const char *name) {
  lua_State *L = m->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  if (lua_getfield(L, -1, name) == LUA_TFUNCTION) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pop(L, 2);
  return 0;
}


/* call the function under nargs arguments; log if it raises */
static void callcb (master *m, const char *name, int nargs) {
  if (pf_pcall(m->L, nargs, 0) != LUA_OK) {
    pf_log(m->L, "error", "%s failed: %s", name, lua_tostring(m->L, -1));
    lua_pop(m->L, 1);
  }
}


static void pushctx (master *m, worker *w) {
  lua_rawgeti(m->L, LUA_REGISTRYINDEX, m->ctxs);
  lua_rawgeti(m->L, -1, w->ctx);
  lua_remove(m->L, -2);
}

/* }====================================================== */


/* {======================================================
** The worker list
** ======================================================= */

/* {======================================================
** accept = "reuseport": the sockets of each id, kept by the master
** ======================================================= */

/* a new list of listeners for an id: a SO_REUSEPORT sibling of each TCP
** template, the Unix ones shared; raises when one cannot be bound */
static int newsockets (master *m) {
  lua_State *L = m->L;
  int i, n;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  lua_getfield(L, -1, "listeners");
  n = (int)luaL_len(L, -1);
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    pf_listener *tpl;
    lua_rawgeti(L, -2, i);
    tpl = pf_checklistener(L, -1);
    if (pf_listener_template(tpl)) {
      if (pf_listener_clone(L, tpl) == NULL)
        return luaL_error(L, "reuseport: bind: %s", strerror(errno));
      lua_remove(L, -2);
    }
    lua_rawseti(L, -2, i);
  }
  lua_remove(L, -2);
  lua_remove(L, -2);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}


/* is the list of listeners of w also another worker's? */
static int shared (master *m, worker *w) {
  lua_State *L = m->L;
  worker *x;
  int same = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->ls);
  for (x = m->list; x != NULL && !same; x = x->next) {
    if (x == w || x->ls == LUA_NOREF) continue;
    lua_rawgeti(L, LUA_REGISTRYINDEX, x->ls);
    same = lua_rawequal(L, -1, -2);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return same;
}


/* close the sockets of w's list that are its own (not a shared Unix one)
** [-0, +0, -] */
static void closeown (lua_State *L, int list) {
  int i, n = (int)luaL_len(L, list);
  for (i = 1; i <= n; i++) {
    pf_listener *l;
    lua_rawgeti(L, list, i);
    l = pf_checklistener(L, -1);
    if (pf_listener_reuseport(l)) pf_listener_close(l);
    lua_pop(L, 1);
  }
}


/* the id of w goes: the master's copies of its sockets close now, so
** that they die with the worker's copies (their queue is drained by the
** worker; net.ipv4.tcp_migrate_req=1 moves what comes in between) */
static void slotclose (master *m, worker *w) {
  if (w->ls == LUA_NOREF || shared(m, w)) return;
  lua_rawgeti(m->L, LUA_REGISTRYINDEX, w->ls);
  closeown(m->L, lua_gettop(m->L));
  lua_pop(m->L, 1);
}

/* }====================================================== */


static void freeworker (master *m, worker *w) {
  worker **p;
  struct ev_loop *loop = EV_DEFAULT;
  for (p = &m->list; *p != NULL; p = &(*p)->next) {
    if ((*p)->replaces == w) (*p)->replaces = NULL;
  }
  for (p = &m->list; *p != w; p = &(*p)->next) {}
  *p = w->next;
  ev_timer_stop(loop, &w->timer);
  lua_rawgeti(m->L, LUA_REGISTRYINDEX, m->ctxs);
  luaL_unref(m->L, -1, w->ctx);
  lua_pop(m->L, 1);
  *p = w;  /* still listed while shared() looks */
  slotclose(m, w);
  *p = w->next;
  luaL_unref(m->L, LUA_REGISTRYINDEX, w->ls);
  free(w);
  if (m->stopping && m->list == NULL)
    ev_break(loop, EVBREAK_ALL);
}


/* w's timer in delay seconds from now: libev's cached time may be as old
** as the Lua hook that ran before, so it is brought up to date first */
static void arm (worker *w, double delay) {
  struct ev_loop *loop = EV_DEFAULT;
  ev_now_update(loop);
  ev_timer_stop(loop, &w->timer);
  ev_timer_set(&w->timer, delay, 0);
  ev_timer_start(loop, &w->timer);
}


/* the next spawn of w in delay seconds */
static void schedule (master *m, worker *w, double delay) {
  w->state = W_PENDING;
  w->pid = 0;
  if (m->running) arm(w, delay);
}


static double backoff (worker *w) {
  double d = BACKOFF0;
  int i;
  for (i = 1; i < w->fails && d < BACKOFFMAX; i++) d *= 2;
  return d < BACKOFFMAX ? d : BACKOFFMAX;
}


/* told to TERM (graceful) or KILL: it goes, and is not respawned */
static void retire (master *m, worker *w, int sig) {
  w->respawn = 0;
  slotclose(m, w);  /* unless a successor shares them */
  if (w->state == W_PENDING) {
    if (!w->hold) freeworker(m, w);
    return;
  }
  if (sig == SIGTERM && w->state == W_STOPPING) return;
  kill(w->pid, sig);
  if (w->state != W_STOPPING && m->running) arm(w, m->graceful);
  w->state = W_STOPPING;
}


static void listening (master *m, int on);

static void becameready (master *m, worker *w) {
  worker *old = w->replaces;
  if (m->channel && !m->stopping) listening(m, 1);
  w->state = W_RUNNING;
  w->fails = 0;
  ev_timer_stop(EV_DEFAULT, &w->timer);
  w->replaces = NULL;
  if (old != NULL) retire(m, old, SIGTERM);
}


static int newslot (master *m) {
  int i;
  for (i = 0; i < PF_MAXPROCS; i++) {
    if (!m->used[i]) {
      m->used[i] = 1;
      memset(&m->score[i], 0, sizeof(m->score[i]));
      return i;
    }
  }
  return -1;
}

/* }====================================================== */


/* {======================================================
** libev callbacks
** ======================================================= */

static void ontimer (struct ev_loop *loop, ev_timer *t, int revents) {
  worker *w = (worker *)t->data;
  (void)loop; (void)revents;
  switch (w->state) {
    case W_PENDING: spawn(w->m, w); break;
    case W_STARTING: becameready(w->m, w); break;
    case W_STOPPING:
      pf_log(w->m->L, "warn", "worker %s (pid %ld) still running after "
             "%.3gs: KILL", w->name, (long)w->pid, w->m->graceful);
      kill(w->pid, SIGKILL);
      break;
    default: break;
  }
}


static void closectl (worker *w) {
  if (w->ctl >= 0) {
    ev_io_stop(EV_DEFAULT, &w->ready);
    close(w->ctl);
    w->ctl = -1;
  }
}


static void onready (struct ev_loop *loop, ev_io *io, int revents) {
  worker *w = (worker *)io->data;
  char c;
  ssize_t n = read(w->ctl, &c, 1);
  (void)loop; (void)revents;
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n != 1 || !w->m->channel)
    closectl(w);  /* one byte is all it says; the channel stays */
  if (n == 1 && w->state == W_STARTING) becameready(w->m, w);
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
static void tellexit (master *m, worker *w, pid_t pid, int status,
                      double delay) {
  lua_State *L = m->L;
  if (!pushcb(m, "on_exit")) return;
  lua_createtable(L, 0, 5);
  pushctx(m, w);
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
  callcb(m, "on_worker_exit", 1);
}


static void exited (master *m, worker *w, int status) {
  char how[32];
  pid_t pid = w->pid;
  double delay = -1;
  if (w->state == W_STARTING && w->ctl >= 0) {  /* said ready, then died? */
    char c;  /* the writer is gone: this read cannot block */
    if (read(w->ctl, &c, 1) == 1) w->state = W_RUNNING;
  }
  closectl(w);
  ev_timer_stop(EV_DEFAULT, &w->timer);
  if (w->slot >= 0) m->used[w->slot] = 0;
  w->slot = -1;
  w->exits++;
  fmtstatus(status, how, sizeof(how));
  w->hold = 1;  /* the log sink and the hook are Lua: they may retire w */
  if (w->respawn && !m->stopping) {
    int early = w->state != W_RUNNING;
    w->fails = early ? w->fails + 1 : 0;
    delay = early ? backoff(w) : 0;
    schedule(m, w, delay);
    pf_log(m->L, early ? "warn" : "info",
           "worker %s (pid %ld) exited: %s%s; respawn in %.3gs", w->name,
           (long)pid, how, early ? " before it was ready" : "", delay);
  }
  else {
    w->state = W_PENDING;
    w->pid = 0;
    pf_log(m->L, "info", "worker %s (pid %ld) stopped: %s", w->name,
           (long)pid, how);
  }
  tellexit(m, w, pid, status, w->respawn && !m->stopping ? delay : -1);
  w->hold = 0;
  if (!w->respawn || m->stopping) freeworker(m, w);
}


/* every child of the process: a worker's exit, or kept for prefork.wait */
static void onchild (struct ev_loop *loop, ev_child *c, int revents) {
  master *m = (master *)c->data;
  worker *w;
  (void)loop; (void)revents;
  for (w = m->list; w != NULL; w = w->next) {
    if (w->pid == c->rpid && w->state != W_PENDING) {
      exited(m, w, c->rstatus);
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
      exited(m, w, w->status);
    }
  } while (w != NULL);
}


/* {======================================================
** accept = "master": the master accepts, the least loaded worker serves
** ======================================================= */

/* connections a worker holds or has not taken yet */
static unsigned long load (master *m, worker *w) {
  pf_score *sc = &m->score[w->slot];
  unsigned long taken = __atomic_load_n(&sc->accepted, __ATOMIC_RELAXED);
  long inflight = __atomic_load_n(&sc->inflight, __ATOMIC_RELAXED);
  return (inflight > 0 ? (unsigned long)inflight : 0)
         + (w->sent > taken ? w->sent - taken : 0);
}


/* the running worker with the least load, not in tried[] (of n) */
static worker *leastloaded (master *m, worker **tried, int n) {
  worker *w, *best = NULL;
  unsigned long bl = 0;
  for (w = m->list; w != NULL; w = w->next) {
    int i, skip = w->state != W_RUNNING || !w->respawn || w->ctl < 0;
    for (i = 0; i < n && !skip; i++) skip = tried[i] == w;
    if (!skip) {
      unsigned long l = load(m, w);
      /* a tie goes to the one handed fewer so far: idle workers share */
      if (best == NULL || l < bl || (l == bl && w->sent < best->sent)) {
        best = w;
        bl = l;
      }
    }
  }
  return best;
}


/* a new connection to the least loaded worker that takes it; a worker
** that is busy (its channel full) or dying is passed over */
static void dispatch (master *m, int fd) {
  worker *tried[8];
  int n = 0;
  for (;;) {
    worker *w = leastloaded(m, tried, n);
    if (w == NULL || n == 8) break;
    if (pf_sendfd(w->ctl, fd)) {
      w->sent++;
      break;
    }
    tried[n++] = w;
  }
  close(fd);  /* the worker has its copy, or nobody could take it */
}


static void onlisten (struct ev_loop *loop, ev_io *io, int revents) {
  master *m = (master *)io->data;
  int i;
  (void)loop; (void)revents;
  for (i = 0; i < 64; i++) {
    int fd;
    if (leastloaded(m, NULL, 0) == NULL) {  /* nobody to serve: wait */
      listening(m, 0);
      return;
    }
    fd = accept4(io->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return;  /* EAGAIN, or a connection that went */
    dispatch(m, fd);
  }
}


/* watch the listeners (accept = "master") or stop watching them */
static void listening (master *m, int on) {
  int i;
  for (i = 0; i < m->nlw; i++) {
    if (on) ev_io_start(EV_DEFAULT, &m->lw[i]);
    else ev_io_stop(EV_DEFAULT, &m->lw[i]);
  }
}


static void startlistening (master *m) {
  lua_State *L = m->L;
  int i;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  lua_getfield(L, -1, "listeners");
  m->nlw = (int)luaL_len(L, -1);
  m->lw = (ev_io *)calloc((size_t)m->nlw + 1, sizeof(ev_io));
  if (m->lw == NULL) m->nlw = 0;
  for (i = 0; i < m->nlw; i++) {
    lua_rawgeti(L, -1, i + 1);
    ev_io_init(&m->lw[i], onlisten, pf_listener_fd(pf_checklistener(L, -1)),
               EV_READ);
    m->lw[i].data = m;
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
}

/* }====================================================== */


/* the master's copies of the listeners: closed at a stop's start (the
** workers close theirs as they stop; a Unix socket's file goes now) */
static void closelisteners (master *m) {
  lua_State *L = m->L;
  int i, n;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  lua_getfield(L, -1, "listeners");
  n = (int)luaL_len(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    pf_listener_close(pf_checklistener(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
}


static void stop (master *m, int how) {
  worker *w, *next;
  int n = 0;
  if (how <= m->stopping) return;
  m->stopping = how;
  for (w = m->list; w != NULL; w = w->next) n++;
  if (how == 1)
    pf_log(m->L, "info", "graceful stop: %d workers get up to %.3gs", n,
           m->graceful);
  else
    pf_log(m->L, "info", "immediate stop: %d workers get KILL", n);
  listening(m, 0);
  closelisteners(m);
  for (w = m->list; w != NULL; w = next) {
    next = w->next;
    retire(m, w, how == 1 ? SIGTERM : SIGKILL);
  }
  if (m->list == NULL && m->running)
    ev_break(EV_DEFAULT, EVBREAK_ALL);
}


static void onsignal (struct ev_loop *loop, ev_signal *s, int revents) {
  master *m = (master *)s->data;
  (void)loop; (void)revents;
  switch (s->signum) {
    case SIGTERM: stop(m, 1); break;
    case SIGINT: stop(m, m->stopping ? 2 : 1); break;  /* twice: now */
    case SIGQUIT: stop(m, 2); break;
    default:  /* HUP, TTIN, TTOU: the front's policy */
      if (!m->stopping && pushcb(m, "on_signal")) {
        lua_pushstring(m->L, pf_signame(s->signum));
        callcb(m, "on_signal", 1);
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


/* what a new worker needs to know, for childmain */
typedef struct childargs {
  master *m;
  worker *w;
  int ctl, slot;
} childargs;


/* the body of a new worker, run protected: the worker side set up over
** the listeners, the title, then opts.child(context) */
static int childmain (lua_State *L) {
  childargs *a = (childargs *)lua_touserdata(L, 1);
  master *m = a->m;
  pf_listener **ls;
  int i, n;
  m->L = L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  if (m->reuseport) {  /* its own sockets; the others' are not its */
    worker *x;
    for (x = m->list; x != NULL; x = x->next) {
      if (x->ls == LUA_NOREF || x->ls == a->w->ls) continue;
      lua_rawgeti(L, LUA_REGISTRYINDEX, x->ls);
      lua_rawgeti(L, LUA_REGISTRYINDEX, a->w->ls);
      if (!lua_rawequal(L, -1, -2)) closeown(L, lua_gettop(L) - 1);
      lua_pop(L, 2);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, a->w->ls);
  }
  else
    lua_getfield(L, -1, "listeners");
  n = (int)luaL_len(L, -1);
  ls = (pf_listener **)lua_newuserdatauv(L, sizeof(pf_listener *)
                                            * ((size_t)n + 1), 0);
  lua_setfield(L, LUA_REGISTRYINDEX, "prefork.worker.listeners");
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, -1, i + 1);
    ls[i] = pf_checklistener(L, -1);
    lua_pop(L, 1);
  }
  pf_worker_setup(ls, n, a->ctl,
                  m->channel ? PF_CHANNEL : m->reuseport ? PF_OWN
                  : m->mutex ? PF_MUTEX : PF_SHARED,
                  &m->score[a->slot], m->pid);
  if (m->mutex && pf_worker_lock(m->lockfd) < 0)
    return luaL_error(L, "mutex: lock file: %s", strerror(errno));
  if (lua_getfield(L, -2, "title") == LUA_TSTRING) {
    char title[256];
    snprintf(title, sizeof(title), "%s worker %s", lua_tostring(L, -1),
             a->w->name);
    pf_settitle(title);
  }
  lua_pop(L, 3);
  if (!pushcb(m, "child"))
    return luaL_error(L, "no worker body");
  pushctx(m, a->w);
  lua_call(L, 1, 0);
  return 0;
}


/* the new worker: its body, then exit; it never returns */
static void child (master *m, worker *w, int ctl, int slot) {
  childargs a;
  a.m = m; a.w = w; a.ctl = ctl; a.slot = slot;
  lua_pushcfunction(m->L, childmain);
  lua_pushlightuserdata(m->L, &a);
  pf_child_run(m->L, 1);
}


/* the spawn failed: retry with backoff. The log sink is Lua, which may
** retire w: it is held meanwhile, and freed after if it was. */
static void forkfailed (master *m, worker *w, const char *what) {
  int en = errno;
  w->fails++;
  schedule(m, w, backoff(w));
  w->hold = 1;
  pf_log(m->L, "error", "worker %s: %s failed: %s; retry in %.3gs",
         w->name, what, strerror(en), backoff(w));
  w->hold = 0;
  if (!w->respawn || m->stopping) freeworker(m, w);
}


static void spawn (master *m, worker *w) {
  struct ev_loop *loop = EV_DEFAULT;
  int fds[2], slot;
  pid_t pid;
  w->hold = 1;
  if (pushcb(m, "before_fork")) {
    pushctx(m, w);
    callcb(m, "before_fork", 1);
  }
  w->hold = 0;
  if (!w->respawn || m->stopping) {  /* the hook stopped it */
    freeworker(m, w);
    return;
  }
  if ((slot = newslot(m)) < 0) {
    errno = EAGAIN;
    forkfailed(m, w, "scoreboard");
    return;
  }
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    m->used[slot] = 0;
    forkfailed(m, w, "socketpair");
    return;
  }
  /* never block on it: a process the worker forked may hold the other
  ** end after the worker is gone */
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  pid = pf_fork();
  if (pid == 0) {
    close(fds[0]);
    child(m, w, fds[1], slot);
  }
  close(fds[1]);
  if (pid < 0) {
    close(fds[0]);
    m->used[slot] = 0;
    forkfailed(m, w, "fork");
    return;
  }
  w->pid = pid;
  w->sent = 0;
  w->slot = slot;
  w->state = W_STARTING;
  w->started = pf_now();
  w->ctl = fds[0];
  ev_io_set(&w->ready, fds[0], EV_READ);
  ev_io_start(loop, &w->ready);
  arm(w, READYAFTER);
  pf_log(m->L, "info", "worker %s (pid %ld) started", w->name, (long)pid);
}

/* }====================================================== */


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
static worker *current (master *m, int idx) {
  lua_State *L = m->L;
  worker *w;
  for (w = m->list; w != NULL; w = w->next) {
    int same;
    if (!w->respawn) continue;
    pushctx(m, w);
    same = sameid(L, idx, -1);
    lua_pop(L, 1);
    if (same) return w;
  }
  return NULL;
}


/*
** m:want(context): a worker runs this context (a table with an id). If
** one runs another context under the same id, the new one replaces it:
** started first, the old one retired when the new one is ready.
*/
static int m_want (lua_State *L) {
  master *m = checkmaster(L);
  worker *w, *old, **p;
  int ls = LUA_NOREF;
  lua_State *saved = m->L;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, !m->stopping, 1, "master is stopping");
  m->L = L;
  old = current(m, 2);
  if (m->reuseport && old == NULL) ls = newsockets(m);  /* may raise */
  else if (m->reuseport) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, old->ls);
    ls = luaL_ref(L, LUA_REGISTRYINDEX);  /* the same sockets */
  }
  w = (worker *)calloc(1, sizeof(worker));
  if (w == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ls);
    return luaL_error(L, "not enough memory");
  }
  w->m = m;
  w->ls = ls;
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
  *p = w;  /* at the tail: spawned and listed in the order wanted */
  if (old != NULL) {
    w->exits = old->exits;
    w->replaces = old->replaces;  /* the one still serving, if any */
    old->replaces = NULL;
    if (old->state == W_RUNNING) w->replaces = old, old->respawn = 0;
    else retire(m, old, SIGTERM);  /* not serving yet: no wait */
  }
  schedule(m, w, 0);
  m->L = saved;
  return 0;
}


/* m:drop(id): the workers of that id drain and go */
static int m_drop (lua_State *L) {
  master *m = checkmaster(L);
  worker *w, *next;
  lua_State *saved = m->L;
  lua_settop(L, 2);
  m->L = L;
  lua_createtable(L, 0, 1);  /* a context-shaped key: {id = id} */
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "id");
  for (w = m->list; w != NULL; w = next) {
    int same;
    next = w->next;
    pushctx(m, w);
    same = sameid(L, 3, -1);
    lua_pop(L, 1);
    if (same) retire(m, w, SIGTERM);
  }
  m->L = saved;
  return 0;
}


/* m:stop([graceful]) */
static int m_stop (lua_State *L) {
  master *m = checkmaster(L);
  lua_State *saved = m->L;
  m->L = L;
  stop(m, lua_isnoneornil(L, 2) || lua_toboolean(L, 2) ? 1 : 2);
  m->L = saved;
  return 0;
}


/* m:workers() -> {{id, pid, state, started, exits, accepted, inflight}} */
static int m_workers (lua_State *L) {
  master *m = checkmaster(L);
  worker *w;
  lua_State *saved = m->L;
  int i = 0;
  m->L = L;
  lua_newtable(L);
  for (w = m->list; w != NULL; w = w->next) {
    lua_createtable(L, 0, 8);
    pushctx(m, w);
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
    lua_pushinteger(L, w->slot < 0 ? 0
                    : (lua_Integer)__atomic_load_n(&m->score[w->slot].accepted,
                                                   __ATOMIC_RELAXED));
    lua_setfield(L, -2, "accepted");
    lua_pushinteger(L, w->slot < 0 ? 0
                    : (lua_Integer)__atomic_load_n(&m->score[w->slot].inflight,
                                                   __ATOMIC_RELAXED));
    lua_setfield(L, -2, "inflight");
    lua_rawseti(L, -2, ++i);
  }
  m->L = saved;
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


/* accept = "mutex": the lock file. Made in a fresh directory that only
** we may write (mode 0700), then unlinked with it: it lives on as an open
** file only, which nobody else can reach, swap or leave behind. */
static int makelock (master *m) {
  const char *base = getenv("XDG_RUNTIME_DIR");
  char dir[256], path[300];
  int en;
  snprintf(dir, sizeof(dir), "%s/prefork-XXXXXX",
           base != NULL && base[0] == '/' ? base : "/tmp");
  if (mkdtemp(dir) == NULL) return -1;
  snprintf(path, sizeof(path), "%s/accept.lock", dir);
  m->lockfd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  en = errno;
  unlink(path);
  rmdir(dir);
  errno = en;
  return m->lockfd < 0 ? -1 : 0;
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
  if (m->mutex && m->lockfd < 0 && makelock(m) != 0)
    return luaL_error(L, "mutex: lock file: %s", strerror(errno));
  if (pf_loop() == NULL)
    return luaL_error(L, "libev: cannot make the default loop");
  m->L = L;
  m->running = 1;
  runningmaster = m;
  startsignals(m);
  pf_onfork(forget, m);
  if (m->channel) startlistening(m);
  while ((w = unspawned(m)) != NULL)  /* a hook may change the list */
    spawn(m, w);
  if (!m->stopping && pushcb(m, "on_start"))
    callcb(m, "on_start", 0);
  if (!m->stopping || m->list != NULL)
    ev_run(EV_DEFAULT, 0);
  m->running = 0;
  runningmaster = NULL;
  listening(m, 0);
  free(m->lw);
  m->lw = NULL;
  m->nlw = 0;
  pf_onfork(NULL, NULL);
  stopsignals(m);
  pf_loop_close();
  if (m->lockfd >= 0) close(m->lockfd);
  m->lockfd = -1;
  pf_log(L, "info", "stopped");
  lua_pushboolean(L, 1);
  return 1;
}


static int m_gc (lua_State *L) {
  master *m = checkmaster(L);
  while (m->list != NULL) {
    worker *w = m->list;
    m->list = w->next;
    luaL_unref(L, LUA_REGISTRYINDEX, w->ls);
    free(w);
  }
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
** core.master(opts) -> master. opts: listeners (list), graceful_timeout,
** title, and the callbacks child(context) (in the new worker),
** before_fork(context), on_exit(info), on_signal(name), on_start().
*/
static int l_master (lua_State *L) {
  master *m;
  luaL_checktype(L, 1, LUA_TTABLE);
  m = (master *)lua_newuserdatauv(L, sizeof(master), 0);
  memset(m, 0, sizeof(*m));
  m->opts = m->ctxs = LUA_NOREF;
  m->lockfd = -1;
  luaL_setmetatable(L, PF_MASTER);
  m->pid = getpid();
  m->L = L;
  lua_getfield(L, 1, "graceful_timeout");
  m->graceful = luaL_optnumber(L, -1, 30);
  lua_pop(L, 1);
  lua_getfield(L, 1, "accept");
  if (lua_isstring(L, -1)) {
    m->channel = strcmp(lua_tostring(L, -1), "master") == 0;
    m->reuseport = strcmp(lua_tostring(L, -1), "reuseport") == 0;
    m->mutex = strcmp(lua_tostring(L, -1), "mutex") == 0;
  }
  lua_pop(L, 1);
  m->score = (pf_score *)mmap(NULL, sizeof(pf_score) * PF_MAXPROCS,
                              PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m->score == MAP_FAILED) {
    m->score = NULL;
    return pf_fail(L, "mmap");
  }
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
  static const luaL_Reg funcs[] = {
    {"master", l_master},
    {NULL, NULL}
  };
  luaL_newmetatable(L, PF_MASTER);
  lua_pushcfunction(L, m_gc);
  lua_setfield(L, -2, "__gc");
  luaL_newlibtable(L, meth);
  luaL_setfuncs(L, meth, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}

/* }====================================================== */
