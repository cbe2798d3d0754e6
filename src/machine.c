/*
** machine.c: the master's state machine on the libev default loop.
**
** Each worker process (or the wish for one, while it waits to be
** respawned) is one struct worker in the table (table.h). Its life:
**
**   PENDING --spawn--> STARTING --ready--> RUNNING
**      ^                  |                   |
**      +----respawn-------+-------exit--------+
**   any state --retire--> STOPPING --exit--> freed
**
** A worker is ready when it says so on its socket: at its first accept
** or serve (or worker:ready, worker:beat). One that dies before it is
** ready, within its first SURVIVED seconds, is respawned with capped
** exponential backoff; max_boot_failures such deaths in a row (boot
** timeouts count) make the master give up. Any other death is respawned
** at once. A replacement (on reload, or to recycle a worker) is started
** first, and the worker it replaces is retired when it is ready; one
** worker at a time is recycled.
**
** Lua decides (the front computes which contexts run); this file does:
** it forks, reaps, times, signals and logs. Every function that may call
** Lua takes the thread to call it on (L): the loop's own (m->L) in libev
** callbacks, the caller's in a method. Calls into Lua happen last in each
** callback, through pf_pcall, and nothing touches a worker after one
** unless the worker is held.
*/

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "state.h"


static void ontimer (struct ev_loop *loop, ev_timer *t, int revents);
static void onready (struct ev_loop *loop, ev_io *io, int revents);
static void nextrecycle (lua_State *L, master *m);
static int allready (master *m);

/* crashes in a row right after the start (of a ready worker) that make
** its respawns back off */
#define CRASHLOOP	3


/* {======================================================
** Workers
** ======================================================= */

/* a new worker for the context at idx, at the list's tail (spawned and
** listed in the order wanted), with the reuseport sockets ports */
worker *pf_newworker (lua_State *L, master *m, int idx, int ports) {
  worker *w = (worker *)calloc(1, sizeof(worker)), **p;
  idx = lua_absindex(L, idx);
  pf_standby_clear(m);  /* copies of the set without w */
  if (w == NULL) {
    pf_ports_release(L, ports);
    luaL_error(L, "not enough memory");
  }
  w->m = m;
  w->ports = ports;
  w->slot = w->ctl = w->tfd = -1;
  w->respawn = 1;
  lua_getfield(L, idx, "id");
  snprintf(w->name, sizeof(w->name), "%s", luaL_tolstring(L, -1, NULL));
  lua_pop(L, 2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->ctxs);
  lua_pushvalue(L, idx);
  w->ctx = luaL_ref(L, -2);
  lua_pop(L, 1);
  ev_init(&w->timer, ontimer);
  ev_init(&w->ready, onready);
  w->timer.data = w->ready.data = w;
  for (p = &m->list; *p != NULL; p = &(*p)->next) {}
  *p = w;
  return w;
}


/* w (a new worker) replaces old: started first, old retired when w is
** ready (at once when old is not serving yet) */
void pf_replaces (lua_State *L, master *m, worker *w, worker *old) {
  w->exits = old->exits;
  w->replaces = old->replaces;  /* the one still serving, if any */
  old->replaces = NULL;
  if (old->state == W_RUNNING) w->replaces = old, old->respawn = 0;
  else pf_retire(L, m, old, SIGTERM);
}


/* w is ready: it takes connections, and what it replaces drains; last,
** the log line (Lua: it may change the list) */
static void becameready (lua_State *L, master *m, worker *w) {
  worker *old = w->replaces;
  char name[sizeof(w->name)];
  pid_t pid = w->pid;
  memcpy(name, w->name, sizeof(name));
  w->state = W_RUNNING;
  w->fails = 0;
  pf_watch_ready(m, w);
  if (m->strategy == PF_ACCEPT_MASTER && w->ctl >= 0 && w->respawn
      && pf_handoff_add(m->handoff, w->ctl, &m->score[w->slot].accepted,
                        &m->score[w->slot].inflight))
    w->target = 1;
  w->replaces = NULL;
  if (old != NULL) pf_retire(L, m, old, SIGTERM);
  if (allready(m)) pf_standby_kick(m, REFILL);
  nextrecycle(L, m);
  pf_log(L, "info", "worker %s (pid %ld) ready", name, (long)pid);
  pf_machine_waitready(L, m);
}


/* every worker of the set is ready (none starting, none to spawn)? */
static int allready (master *m) {
  worker *w;
  for (w = m->list; w != NULL; w = w->next)
    if (w->respawn && w->state != W_RUNNING) return 0;
  return 1;
}


/* on_ready() once every worker of the set is ready: after the start or a
** reload (the front asks with m->waitready) */
void pf_machine_waitready (lua_State *L, master *m) {
  if (!m->waitready || m->stopping || !allready(m)) return;
  m->waitready = 0;
  if (pf_pushcb(L, m, "on_ready")) pf_callhook(L, "on_ready", 0);
}

/* }====================================================== */


/* {======================================================
** Recycling (max_requests, max_memory): one worker at a time, its
** replacement up before it drains
** ======================================================= */

/* w is due for recycling, for why */
static void markdue (worker *w, const char *why) {
  if (w->due || !w->respawn) return;
  w->due = 1;
  snprintf(w->why, sizeof(w->why), "%s", why);
}


/* start recycling the first worker that is due, unless one is under way:
** its replacement starts */
static void nextrecycle (lua_State *L, master *m) {
  worker *w, *nw;
  if (m->recycling != NULL || m->stopping || !m->running) return;
  for (w = m->list; w != NULL; w = w->next)
    if (w->due && w->respawn && w->state == W_RUNNING) break;
  if (w == NULL) return;
  m->recycling = w;
  m->recycled++;
  pf_pushctx(L, m, w);
  nw = pf_newworker(L, m, -1,
                    m->strategy == PF_ACCEPT_REUSEPORT
                    ? pf_ports_share(L, w->ports) : LUA_NOREF);
  lua_pop(L, 1);
  pf_replaces(L, m, nw, w);
  pf_schedule(m, nw, 0);
  pf_log(L, "info", "worker %s (pid %ld) is recycled (%s): a new one "
         "starts, then it drains", w->name, (long)w->pid, w->why);
}


/* max_memory: the workers' RSS, once a second */
static void onmemory (struct ev_loop *loop, ev_timer *t, int revents) {
  master *m = (master *)t->data;
  worker *w;
  (void)loop; (void)revents;
  for (w = m->list; w != NULL; w = w->next) {
    double rss;
    char why[96];
    if (w->state != W_RUNNING || w->due || !w->respawn) continue;
    rss = pf_rss(w->pid);
    if (rss <= m->maxmemory) continue;
    snprintf(why, sizeof(why), "%.0f MB resident, over max_memory (%.0f MB)",
             rss / 1048576, m->maxmemory / 1048576);
    markdue(w, why);
  }
  nextrecycle(m->L, m);
}

/* }====================================================== */


/* {======================================================
** Callbacks
** ======================================================= */

static void ontimer (struct ev_loop *loop, ev_timer *t, int revents) {
  worker *w = (worker *)t->data;
  master *m = w->m;
  (void)loop; (void)revents;
  switch (w->state) {
    case W_PENDING: pf_spawn(m->L, m, w); break;
    case W_STOPPING:
      pf_log(m->L, "warn", "worker %s (pid %ld) still running after "
             "%.3gs: KILL", w->name, (long)w->pid, m->graceful);
      pf_killgroup(w);
      break;
    default: w->survived = 1; break;
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


/* what w said on its socket: 'r' ready, 'm' served its max_requests;
** -1 at its end (or when it broke), 0 else */
static int heard (worker *w, int *isready, int *isdue) {
  char buf[16];
  ssize_t n, i;
  while ((n = read(w->ctl, buf, sizeof(buf))) > 0) {
    for (i = 0; i < n; i++) {
      if (buf[i] == 'r') *isready = 1;
      else if (buf[i] == 'm') *isdue = 1;
    }
  }
  return n == 0 || (errno != EAGAIN && errno != EINTR) ? -1 : 0;
}


static void onready (struct ev_loop *loop, ev_io *io, int revents) {
  worker *w = (worker *)io->data;
  master *m = w->m;
  int isready = 0, isdue = 0;
  (void)loop; (void)revents;
  if (heard(w, &isready, &isdue) < 0) closectl(m, w);
  if (isdue && w->slot >= 0) {
    char why[64];
    snprintf(why, sizeof(why), "it served %lu requests, its max_requests",
             m->score[w->slot].limit);
    markdue(w, why);
  }
  if (isready && w->state == W_STARTING) becameready(m->L, m, w);
  else if (isdue) nextrecycle(m->L, m);
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


/* w's process is gone: what it said last, its slot, socket, watchdog */
static void gone (master *m, worker *w) {
  int isready = 0, isdue = 0;
  if (w->ctl >= 0) {  /* said ready, then died? (the reads cannot block) */
    heard(w, &isready, &isdue);
    if (isready && w->state == W_STARTING) w->state = W_RUNNING;
  }
  closectl(m, w);
  pf_watch_stop(w);
  ev_timer_stop(EV_DEFAULT, &w->timer);
  if (w->slot >= 0) {
    m->requests += m->score[w->slot].requests;
    pf_freeslot(m, w->slot);
  }
  w->slot = -1;
  w->exits++;
  if (m->recycling == w) m->recycling = NULL;
}


static void stop (lua_State *L, master *m, int how, const char *cause);

/* a death before w was ready: max_boot_failures in a row, and the
** master gives up (and stops) */
static void failed (lua_State *L, master *m, worker *w, const char *how) {
  w->fails++;
  if (m->maxfails > 0 && w->fails >= m->maxfails && m->giveup[0] == '\0') {
    snprintf(m->giveup, sizeof(m->giveup), "worker %s failed %d times in a "
             "row before it was ready (last: %s)", w->name, w->fails, how);
    stop(L, m, 1, "giving up");
  }
}


/* the worker itself failed: an error status or a fatal signal (not
** KILL, TERM and the like, which come from outside) */
static int crashed (int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status) != 0;
  switch (WTERMSIG(status)) {
    case SIGSEGV: case SIGBUS: case SIGFPE: case SIGILL: case SIGABRT:
    case SIGSYS: case SIGTRAP:
      return 1;
    default:
      return 0;
  }
}


/* the respawn delay of w, gone with status: 0, or a backoff when it died
** early (not ready in its first SURVIVED seconds or by its boot_timeout)
** or keeps crashing right after its start though ready (CRASHLOOP times) */
static double respawnin (worker *w, int notready, int status) {
  if (notready && (!w->survived || w->hung))
    return pf_backoff(w->fails);
  if (!notready && !w->survived && crashed(status)) {
    if (++w->crashes >= CRASHLOOP) return pf_backoff(w->crashes - 1);
  }
  else
    w->crashes = 0;
  return 0;
}


/* w's process is gone (status): it is respawned (at once, or after a
** backoff: respawnin), or freed */
static void exited (lua_State *L, master *m, worker *w, int status) {
  char how[32];
  pid_t pid = w->pid;
  double delay = 0;
  int notready;
  gone(m, w);
  notready = w->state != W_RUNNING;
  w->state = W_PENDING;  /* no process: nothing to signal */
  w->pid = 0;
  fmtstatus(status, how, sizeof(how));
  w->hold = 1;  /* the log sink and the hook are Lua: they may retire w */
  if (!notready) w->fails = 0;
  else if (w->respawn && !m->stopping) failed(L, m, w, how);  /* may stop */
  if (w->respawn && !m->stopping) {
    delay = respawnin(w, notready, status);
    m->respawns++;
    pf_schedule(m, w, delay);
    pf_log(L, delay > 0 ? "warn" : "info",
           "worker %s (pid %ld) %s: %s%s; respawn in %.3gs", w->name,
           (long)pid, w->hung ? "timed out" : "exited", how,
           notready ? " before it was ready" : "", delay);
  }
  else
    pf_log(L, "info", "worker %s (pid %ld) stopped: %s", w->name,
           (long)pid, how);
  tellexit(L, m, w, pid, status, w->respawn && !m->stopping ? delay : -1);
  w->hold = 0;
  if (!w->respawn || m->stopping) pf_freeworker(L, m, w);
  nextrecycle(L, m);
}


/* a standby died on its own (or by a hand from outside): a new one in a
** delay that doubles while they keep dying */
static void standbygone (lua_State *L, master *m, pid_t pid, int status) {
  char how[32];
  double delay = pf_backoff(++m->sbfails);
  pf_standby_kick(m, delay);
  fmtstatus(status, how, sizeof(how));
  pf_log(L, "warn", "standby (pid %ld) exited: %s; a new one in %.3gs",
         (long)pid, how, delay);
}


/* a worker of the set (one that is respawned when it exits)? */
static int anywanted (master *m) {
  worker *w;
  for (w = m->list; w != NULL; w = w->next)
    if (w->respawn) return 1;
  return 0;
}


/* a standby that is missing, once the set is ready; one per loop turn
** (a fork holds up the loop) */
static void onrefill (struct ev_loop *loop, ev_timer *t, int revents) {
  master *m = (master *)t->data;
  (void)loop; (void)revents;
  if (m->stopping || !anywanted(m) || !allready(m))
    return;  /* becameready kicks again */
  if (pf_standby_count(m) >= m->standbys) return;
  if (!pf_spawn_standby(m->L, m))  /* logged */
    pf_standby_kick(m, pf_backoff(++m->sbfails));
  else if (pf_standby_count(m) < m->standbys)
    pf_standby_kick(m, 0);
}


/* every child of the process: a worker's exit, a standby's, or kept for
** prefork.wait */
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
  if (pf_standby_reaped(m, c->rpid))
    standbygone(m->L, m, c->rpid, c->rstatus);
  else if (!pf_upgrade_reaped(m, c->rpid, c->rstatus))
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
  if (pf_standby_reaped(m, pid)) {  /* not the hook's: replaced */
    pf_standby_kick(m, pf_backoff(++m->sbfails));
    return 1;
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

/* }====================================================== */


/* {======================================================
** Stopping, signals, ticks
** ======================================================= */

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


/* stop (how: 1 graceful, 2 immediate), for cause ("TERM", ...) */
static void stop (lua_State *L, master *m, int how, const char *cause) {
  worker *w, *next;
  int n = 0;
  if (how <= m->stopping) return;
  m->stopping = how;
  pf_standby_clear(m);
  for (w = m->list; w != NULL; w = w->next) n++;
  if (m->handoff != NULL) pf_handoff_pause(m->handoff);
  ev_timer_stop(EV_DEFAULT, &m->memory);
  ev_timer_stop(EV_DEFAULT, &m->tick);
  closelisteners(L, m);
  for (w = m->list; w != NULL; w = next) {
    next = w->next;
    pf_retire(L, m, w, how == 1 ? SIGTERM : SIGKILL);
  }
  if (m->list == NULL && m->running)
    ev_break(EV_DEFAULT, EVBREAK_ALL);
  if (pf_pushcb(L, m, "on_stopping")) pf_callhook(L, "on_stopping", 0);
  if (how == 1)
    pf_log(L, "info", "stopping (%s): graceful stop, %d worker%s up to "
           "%.3gs", cause, n, n == 1 ? " gets" : "s get", m->graceful);
  else
    pf_log(L, "info", "stopping (%s): immediate stop, %d worker%s KILL",
           cause, n, n == 1 ? " gets" : "s get");
}


void pf_master_stop (lua_State *L, master *m, int how, const char *cause) {
  stop(L, m, how, cause);
}


/* a signal that the front handles (HUP, TTIN, TTOU, USR1, USR2) */
static void tofront (master *m, int sig, int n) {
  lua_State *L = m->L;
  while (n-- > 0 && !m->stopping && pf_pushcb(L, m, "on_signal")) {
    lua_pushstring(L, pf_signame(sig));
    pf_callhook(L, "on_signal", 1);
  }
}


/* n of sig came (signals.c) */
static void onsignal (master *m, int sig, int n) {
  lua_State *L = m->L;
  switch (sig) {
    case SIGTERM: stop(L, m, 1, "TERM"); break;
    case SIGINT: stop(L, m, m->stopping ? 2 : 1, "INT"); break;  /* twice */
    case SIGQUIT: stop(L, m, 2, "QUIT"); break;
    case SIGHUP: case SIGTTIN: case SIGTTOU: case SIGUSR1: case SIGUSR2:
      tofront(m, sig, n);
      break;
    default:
      pf_log(L, "info", "%s: ignored", pf_signame(sig));
  }
}


static void ontick (struct ev_loop *loop, ev_timer *t, int revents) {
  master *m = (master *)t->data;
  (void)loop; (void)revents;
  if (pf_pushcb(m->L, m, "on_tick")) pf_callhook(m->L, "on_tick", 0);
}

/* }====================================================== */


/* {======================================================
** The machine's start and end
** ======================================================= */

/* in a new child (any fork while the master runs): drop the master's
** watchers, which libev keeps in process-wide tables, and its fds */
static void forget (void *ud) {
  master *m = (master *)ud;
  worker *w;
  standby *s;
  pf_signals_forget(m);
  pf_status_forget();
  pf_upgrade_forget(m);
  ev_child_stop(EV_DEFAULT, &m->reaper);
  pf_onreap(NULL, NULL);
  for (w = m->list; w != NULL; w = w->next) {
    if (w->ctl >= 0) close(w->ctl);
    if (w->tfd >= 0) close(w->tfd);
    w->ctl = w->tfd = -1;
  }
  for (s = m->spare; s != NULL; s = s->next) {
    close(s->ctl);
    close(s->tfd);
  }
  m->spare = NULL;
  m->running = 0;
}


/* the loop's watchers of the master: children, signals, timers */
void pf_machine_start (master *m, double tick) {
  m->onsignal = onsignal;
  pf_signals_start(m);
  ev_child_init(&m->reaper, onchild, 0, 0);
  m->reaper.data = m;
  ev_child_start(EV_DEFAULT, &m->reaper);
  ev_timer_init(&m->later, onlater, 0, 0);
  ev_timer_init(&m->memory, onmemory, 1.0, 1.0);
  ev_timer_init(&m->tick, ontick, tick, tick);
  ev_init(&m->refill, onrefill);
  m->later.data = m->memory.data = m->tick.data = m->refill.data = m;
  if (m->maxmemory > 0) ev_timer_start(EV_DEFAULT, &m->memory);
  if (tick > 0) ev_timer_start(EV_DEFAULT, &m->tick);
  pf_onreap(stolen, m);
  pf_onfork(forget, m);
}


void pf_machine_stop (master *m) {
  pf_onfork(NULL, NULL);
  pf_onreap(NULL, NULL);
  ev_timer_stop(EV_DEFAULT, &m->later);
  ev_timer_stop(EV_DEFAULT, &m->memory);
  ev_timer_stop(EV_DEFAULT, &m->tick);
  pf_standby_clear(m);  /* (not running: no refill comes) */
  ev_timer_stop(EV_DEFAULT, &m->refill);
  ev_child_stop(EV_DEFAULT, &m->reaper);
  pf_signals_stop(m);
  pf_upgrade_forget(m);
}

/* }====================================================== */
