/*
** table.c: the master's worker table: calls into the master's Lua hooks,
** and the operations on a worker's entry that the state machine
** (master.c) and spawning (spawn.c) share: timers, backoff, retiring,
** scoreboard slots, the standbys.
*/

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "state.h"


/* {======================================================
** Calls into Lua
** ======================================================= */

/* push opts[name] if it is a function [-0, +(0|1), -] */
int pf_pushcb (lua_State *L, master *m, const char *name) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  if (lua_getfield(L, -1, name) == LUA_TFUNCTION) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pop(L, 2);
  return 0;
}


/* call the function under nargs arguments; log if it raises */
void pf_callhook (lua_State *L, const char *name, int nargs) {
  if (pf_pcall(L, nargs, 0) != LUA_OK) {
    pf_log(L, "error", "%s failed: %s", name, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}


void pf_pushctx (lua_State *L, master *m, worker *w) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->ctxs);
  lua_rawgeti(L, -1, w->ctx);
  lua_remove(L, -2);
}


/* push the master's list of listeners */
void pf_pushlisteners (lua_State *L, master *m) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  lua_getfield(L, -1, "listeners");
  lua_remove(L, -2);
}

/* }====================================================== */


/* {======================================================
** The worker list
** ======================================================= */

/* w's channel takes no more connections (accept = "master") */
void pf_untarget (master *m, worker *w) {
  if (w->target) pf_handoff_remove(m->handoff, w->ctl);
  w->target = 0;
}


/* w's reuseport sockets are let go: the last holder closes the master's
** copies, which then die with the worker's (their queue is drained by
** the worker; net.ipv4.tcp_migrate_req=1 moves what comes in between) */
void pf_dropports (lua_State *L, worker *w) {
  pf_ports_release(L, w->ports);
  w->ports = LUA_NOREF;
}


void pf_freeworker (lua_State *L, master *m, worker *w) {
  worker **p;
  for (p = &m->list; *p != NULL; p = &(*p)->next) {
    if ((*p)->replaces == w) (*p)->replaces = NULL;
  }
  for (p = &m->list; *p != w; p = &(*p)->next) {}
  *p = w->next;
  ev_timer_stop(EV_DEFAULT, &w->timer);
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->ctxs);
  luaL_unref(L, -1, w->ctx);
  lua_pop(L, 1);
  pf_dropports(L, w);
  free(w);
  if (m->stopping && m->list == NULL)
    ev_break(EV_DEFAULT, EVBREAK_ALL);
}


/* w's timer in delay seconds from now: libev's cached time may be as old
** as the Lua hook that ran before, so it is brought up to date first */
void pf_arm (worker *w, double delay) {
  struct ev_loop *loop = EV_DEFAULT;
  ev_now_update(loop);
  ev_timer_stop(loop, &w->timer);
  ev_timer_set(&w->timer, delay, 0);
  ev_timer_start(loop, &w->timer);
}


/* the next spawn of w in delay seconds */
void pf_schedule (master *m, worker *w, double delay) {
  w->state = W_PENDING;
  w->pid = 0;
  if (m->running) pf_arm(w, delay);
}


/* the delay after n failures in a row: doubling, capped */
double pf_backoff (int n) {
  double d = BACKOFF0;
  int i;
  for (i = 1; i < n && d < BACKOFFMAX; i++) d *= 2;
  return d < BACKOFFMAX ? d : BACKOFFMAX;
}


/* told to TERM (graceful) or KILL (its process group): it goes, and is
** not respawned */
void pf_retire (lua_State *L, master *m, worker *w, int sig) {
  pf_standby_clear(m);  /* a copy of the set w leaves */
  w->respawn = 0;
  pf_untarget(m, w);
  pf_dropports(L, w);  /* unless a successor shares them */
  if (w->state == W_PENDING) {
    if (!w->hold) pf_freeworker(L, m, w);
    return;
  }
  if (sig == SIGTERM && w->state == W_STOPPING) return;
  if (sig == SIGKILL) pf_killgroup(w);
  else kill(w->pid, sig);
  if (w->state != W_STOPPING && m->running) pf_arm(w, m->graceful);
  w->state = W_STOPPING;
  pf_watch_pause(w);
}


/* the lowest free scoreboard slot, now in use; -1 when none is left */
int pf_newslot (master *m) {
  int i;
  for (i = 0; i < PF_MAXPROCS; i++) {
    if (!m->used[i]) {
      m->used[i] = 1;
      memset(&m->score[i], 0, sizeof(m->score[i]));
      if (i >= m->board->top)
        __atomic_store_n(&m->board->top, i + 1, __ATOMIC_RELAXED);
      return i;
    }
  }
  return -1;
}


/* slot i is free again: its worker is gone, so it accepts no more */
void pf_freeslot (master *m, int i) {
  int top = m->board->top;
  __atomic_store_n(&m->score[i].accepting, 0, __ATOMIC_RELAXED);
  m->used[i] = 0;
  while (top > 0 && !m->used[top - 1]) top--;
  __atomic_store_n(&m->board->top, top, __ATOMIC_RELAXED);
}

/* }====================================================== */


/* {======================================================
** The standbys: each a copy of the worker set as it was at its fork
** ======================================================= */

/* *p goes from the list: its fds and slot are let go */
static void unlink_standby (master *m, standby **p) {
  standby *s = *p;
  *p = s->next;
  ev_io_stop(EV_DEFAULT, &s->said);
  ev_timer_stop(EV_DEFAULT, &s->late);
  close(s->ctl);
  close(s->tfd);
  pf_freeslot(m, s->slot);
  free(s);
}


/* *p is KILLed and reaped now (it ran no code of the user's), and goes */
void pf_standby_kill (master *m, standby **p) {
  pid_t pid = (*p)->pid;
  kill(pid, SIGKILL);
  unlink_standby(m, p);
  while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
}


/* the set changes (a worker comes or goes): the standbys, copies of the
** old set, go; new ones are forked once the set is ready */
void pf_standby_clear (master *m) {
  while (m->spare != NULL)
    pf_standby_kill(m, &m->spare);
  pf_standby_kick(m, REFILL);
}


/* the standbys that are missing are forked in delay seconds (if the set
** is ready then: machine.c's refill) */
void pf_standby_kick (master *m, double delay) {
  if (m->standbys == 0 || !m->running || m->stopping) return;
  ev_timer_stop(EV_DEFAULT, &m->refill);
  ev_timer_set(&m->refill, delay, 0);
  ev_timer_start(EV_DEFAULT, &m->refill);
}


/* pid was reaped: 1 if it was a standby's (now gone from the list) */
int pf_standby_reaped (master *m, pid_t pid) {
  standby **p;
  for (p = &m->spare; *p != NULL; p = &(*p)->next) {
    if ((*p)->pid == pid) {
      unlink_standby(m, p);
      return 1;
    }
  }
  return 0;
}


int pf_standby_count (master *m) {
  standby *s;
  int n = 0;
  for (s = m->spare; s != NULL; s = s->next) n++;
  return n;
}

/* }====================================================== */
