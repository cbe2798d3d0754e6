/*
** master.c: the master's Lua interface (core.master and its methods),
** its options, its statistics and its run. The state machine that the
** run drives is machine.c's; forking is spawn.c's; the worker table is
** table.c's.
*/

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#include "state.h"


static const char *const statenames[] =
  {"starting", "starting", "running", "stopping"};

/* the master running in this process (not when its pid is another's: a
** worker inherits the variable): there is one default loop */
static master *runningmaster = NULL;


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
  w = pf_newworker(L, m, 2, wantports(L, m, old));
  if (old != NULL) pf_replaces(L, m, w, old);
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


/* m:renew(): the standbys go (KILLed now), new ones come once the set
** is ready: after a reload, or a reopened log, that they did not see */
static int m_renew (lua_State *L) {
  pf_standby_clear(checkmaster(L));
  return 0;
}


/* m:stop([graceful [, cause]]) */
static int m_stop (lua_State *L) {
  master *m = checkmaster(L);
  pf_master_stop(L, m, lua_isnoneornil(L, 2) || lua_toboolean(L, 2) ? 1 : 2,
                 luaL_optstring(L, 3, "master:stop"));
  return 0;
}


/* a counter of w's scoreboard slot, 0 without one */
#define scored(m, w, field) ((w)->slot < 0 ? 0 \
  : __atomic_load_n(&(m)->score[(w)->slot].field, __ATOMIC_RELAXED))

static void setnum (lua_State *L, const char *k, lua_Number v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static void setint (lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}


/* the entry of m:workers() for w: {id, context, pid, started, state,
** exits, accepted, inflight, requests, beat, rss} */
static void pushworker (lua_State *L, master *m, worker *w) {
  lua_createtable(L, 0, 11);
  pf_pushctx(L, m, w);
  lua_getfield(L, -1, "id");
  lua_setfield(L, -3, "id");
  lua_setfield(L, -2, "context");
  lua_pushstring(L, statenames[w->state]);
  lua_setfield(L, -2, "state");
  setint(L, "exits", w->exits);
  setint(L, "accepted", (lua_Integer)scored(m, w, accepted));
  setint(L, "inflight", (lua_Integer)scored(m, w, inflight));
  setint(L, "requests", (lua_Integer)scored(m, w, requests));
  if (w->pid <= 0) return;
  setint(L, "pid", w->pid);
  setnum(L, "started", w->started);
  if (w->slot >= 0) {
    double rss = pf_rss(w->pid);
    setnum(L, "beat", pf_coarse() - pf_score_beat(&m->score[w->slot]));
    if (rss >= 0) setint(L, "rss", (lua_Integer)rss);
  }
}


/* m:workers() -> a list of what pushworker tells */
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


/* the pids of the standbys, as a list */
static void pushstandbys (lua_State *L, master *m) {
  standby *s;
  int i = 0;
  lua_newtable(L);
  for (s = m->spare; s != NULL; s = s->next) {
    lua_pushinteger(L, s->pid);
    lua_rawseti(L, -2, ++i);
  }
}


/* m:stats() -> {pid, started, uptime, workers = m:workers(), standby,
** respawns, timeouts, recycled, requests} (the front adds reloads and
** upgrades) */
static int m_stats (lua_State *L) {
  master *m = checkmaster(L);
  worker *w;
  unsigned long requests = m->requests;
  for (w = m->list; w != NULL; w = w->next)
    requests += scored(m, w, requests);
  lua_createtable(L, 0, 9);
  setint(L, "pid", m->pid);
  setnum(L, "started", m->started);
  setnum(L, "uptime", m->running ? pf_now() - m->started : 0);
  setint(L, "respawns", (lua_Integer)m->respawns);
  setint(L, "timeouts", (lua_Integer)m->timeouts);
  setint(L, "recycled", (lua_Integer)m->recycled);
  setint(L, "requests", (lua_Integer)requests);
  m_workers(L);
  lua_setfield(L, -2, "workers");
  pushstandbys(L, m);
  lua_setfield(L, -2, "standby");
  return 1;
}


/* m:waitready(): on_ready() once every worker of the set is ready (now,
** if they are) */
static int m_waitready (lua_State *L) {
  master *m = checkmaster(L);
  m->waitready = 1;
  pf_machine_waitready(L, m);
  return 0;
}


/* m:upgrading(pid, fd, timeout): watch the new master of an upgrade
** (on_upgrade(ok, why) tells the outcome) */
static int m_upgrading (lua_State *L) {
  master *m = checkmaster(L);
  pid_t pid = (pid_t)luaL_checkinteger(L, 2);
  int fd = (int)luaL_checkinteger(L, 3);
  luaL_argcheck(L, m->uppid == 0, 1, "an upgrade is under way");
  pf_upgrade_watch(m, pid, fd, luaL_checknumber(L, 4));
  return 0;
}


/* a worker wanted before run, not yet forked nor waiting for a retry */
static worker *unspawned (master *m) {
  worker *w;
  for (w = m->list; w != NULL; w = w->next)
    if (w->state == W_PENDING && !ev_is_active(&w->timer)) return w;
  return NULL;
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
  if (runningmaster != NULL && runningmaster->pid == getpid())
    return luaL_error(L, "another master runs in this process");
  startstrategy(L, m);
  if (pf_loop() == NULL)
    return luaL_error(L, "libev: cannot make the default loop");
  m->L = L;
  m->running = 1;
  m->waitready = 1;
  m->started = pf_now();
  runningmaster = m;
  pf_machine_start(m, m->tickevery);
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  lua_getfield(L, -1, "status_listener");
  pf_status_start(m, lua_isnil(L, -1) ? NULL : pf_checklistener(L, -1));
  lua_pop(L, 2);
  while ((w = unspawned(m)) != NULL)  /* a hook may change the list */
    pf_spawn(L, m, w);
  if (!m->stopping && pf_pushcb(L, m, "on_start"))
    pf_callhook(L, "on_start", 0);
  if (!m->stopping || m->list != NULL)
    ev_run(EV_DEFAULT, 0);
  m->running = 0;
  runningmaster = NULL;
  endstrategy(m);
  pf_status_stop();
  pf_machine_stop(m);
  pf_loop_close();
  pf_log(L, "info", "stopped");
  if (m->giveup[0] != '\0')
    return pf_failwith(L, m->giveup, 0);
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
  if (m->board != NULL) {
    munmap(m->board, sizeof(pf_board));
    m->board = NULL;
    m->score = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, m->opts);
  luaL_unref(L, LUA_REGISTRYINDEX, m->ctxs);
  m->opts = m->ctxs = LUA_NOREF;
  return 0;
}


/* opts[k] as a number >= 0 (false: 0), or def */
static double optsecs (lua_State *L, const char *k, double def) {
  double v = def;
  int t = lua_getfield(L, 1, k);
  if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1)) v = 0;
  else if (t != LUA_TNIL) v = luaL_checknumber(L, -1);
  lua_pop(L, 1);
  return v < 0 ? 0 : v;
}


/* the options of supervision (the front checked their types) */
static void readopts (lua_State *L, master *m) {
  m->graceful = optsecs(L, "graceful_timeout", 30);
  m->timeout = optsecs(L, "timeout", 30);
  m->boottimeout = optsecs(L, "boot_timeout", 60);
  m->maxrequests = (unsigned long)optsecs(L, "max_requests", 0);
  m->jitter = (unsigned long)optsecs(L, "max_requests_jitter", 0);
  m->maxmemory = optsecs(L, "max_memory", 0);
  m->maxfails = (int)optsecs(L, "max_boot_failures", 10);
  m->tickevery = optsecs(L, "tick", 0);
  m->standbys = (int)optsecs(L, "standby", 0);
  if (lua_getfield(L, 1, "user") == LUA_TSTRING) {  /* the front found them */
    snprintf(m->user, sizeof(m->user), "%s", lua_tostring(L, -1));
    lua_getfield(L, 1, "uid");
    lua_getfield(L, 1, "gid");
    m->uid = (uid_t)luaL_checkinteger(L, -2);
    m->gid = (gid_t)luaL_checkinteger(L, -1);
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "accept");
  m->strategy = pf_checkstrategy(L, -1);
  lua_pop(L, 1);
}


/*
** core.master(opts) -> master | fail. opts: listeners (list),
** graceful_timeout, accept (the strategy), title, timeout, boot_timeout,
** max_requests, max_requests_jitter, max_memory, max_boot_failures,
** tick, standby (a count), and the callbacks child(context) (in the new worker),
** before_fork(context), on_exit(info), on_signal(name), on_start(),
** on_tick().
*/
static int l_master (lua_State *L) {
  master *m;
  luaL_checktype(L, 1, LUA_TTABLE);
  m = (master *)lua_newuserdatauv(L, sizeof(master), 0);
  memset(m, 0, sizeof(*m));
  m->opts = m->ctxs = LUA_NOREF;
  m->lockfd = m->upfd = -1;
  m->pid = getpid();
  m->L = L;
  readopts(L, m);
  srandom((unsigned)time(NULL) ^ (unsigned)m->pid);  /* the jitter */
  m->board = (pf_board *)mmap(NULL, sizeof(pf_board), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m->board == MAP_FAILED) {
    m->board = NULL;
    return pf_fail(L, "mmap");
  }
  m->score = m->board->slot;
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
    {"workers", m_workers}, {"stats", m_stats}, {"waitready", m_waitready},
    {"upgrading", m_upgrading}, {"renew", m_renew},
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
