/*
** task.c: the coroutine scheduler. A task is a Lua coroutine on a libev
** loop of the process's own (not the master's default loop): worker:serve
** runs a task per connection, a pool worker with async = true a task per
** call. A blocking call of this module (conn:read, conn:write,
** prefork.sleep, prefork.wait_fd, recvfds, an awaited pool call) made in
** a task yields instead (pf_waitk), and the loop resumes the task when its
** fd is ready or its time is up; made anywhere else it blocks in poll.
**
** Stopping: pf_task_stop ends the waits of the tasks that wait idle (for
** a new request on a keep-alive connection) with PF_STOPPING, and the
** loop ends once no task is left. An idle connection first gets a last
** chance (the linger, a second): a request its client sent as the stop
** began, or sends in that moment, is read and answered (the handler sees
** worker:stopping() and says that the connection closes), instead of
** being lost with the connection.
*/

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>

#include "prefork.h"


typedef struct task {
  struct task *next, *prev;
  lua_State *co;
  int coref;  /* registry refs: the coroutine, the object it owns */
  int objref;
  int nargs;  /* arguments of its first resume, not started yet */
  int reason;  /* how its last wait ended: PF_READY, ... */
  int idle;  /* waiting idle (for a new request) */
  int lingering;  /* the last chance an idle wait gets at a stop */
  int lingered;  /* it had it */
  int ioevs;  /* the events io was last set for, */
  int iosame;  /* for an fd that stays open (PF_WAITSAMEFD), */
  unsigned long ioepoch;  /* in this epoch of pf_fdclosed */
  ev_io io;
  ev_timer timer;
} task;


static struct {
  struct ev_loop *loop;
  ev_prepare idle;  /* the loop turns: idle while it waits, */
  ev_check busy;  /* busy (and a heartbeat) when it wakes */
  lua_State *L;  /* the thread that runs the loop */
  int running;
  int stopping;
  double linger;  /* seconds an idle wait still gets at a stop */
  task *tasks;  /* every live task */
  task *pool;  /* finished ones kept for the next tasks */
  int npool;
  unsigned long epoch;  /* PF_WAITSAMEFD fds closed so far (pf_fdclosed) */
} T;  /* all zero: not running */


static const char TASKS = 't';  /* registry key: coroutine -> its task */

/* coroutines kept for reuse at most */
#define POOLMAX	256


/*
** A task that waits again on the same open file, with the same events,
** in the same resume as its last wait (a read after a write, the next
** request on a keep-alive connection) leaves its watcher as libev knows
** it: ev_io_set would make libev call epoll_ctl again. That is right only
** while the file stays open: an fd closed in between (the kernel drops
** it from the epoll set) and its number reused would never wake the
** wait. So the caller vouches (PF_WAITSAMEFD) and every close of such an
** fd counts (pf_fdclosed); anything else is set anew.
*/
static void setio (task *t, int fd, int events, int same) {
  int evs = (events & POLLIN ? EV_READ : 0) | (events & POLLOUT ? EV_WRITE : 0);
  if (!same || !t->iosame || t->io.fd != fd || t->ioevs != evs
      || t->ioepoch != T.epoch)
    ev_io_set(&t->io, fd, evs);
  t->ioevs = evs;
  t->iosame = same;
  t->ioepoch = T.epoch;
}


/* an fd that PF_WAITSAMEFD waits may use is being closed or handed over:
** the next wait on its number registers it anew */
void pf_fdclosed (void) {
  T.epoch++;
}


/* the task of coroutine L, NULL when L is not a task */
static task *findtask (lua_State *L) {
  task *t;
  if (!T.running) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS);
  lua_rawgetp(L, -1, L);
  t = (task *)lua_touserdata(L, -1);
  lua_pop(L, 2);
  return t;
}


/* {======================================================
** Blocking waits (outside a task)
** ======================================================= */

/* the monotonic deadline of a call that may take timeout seconds (< 0:
** none) */
double pf_deadline (double timeout) {
  return timeout < 0 ? -1 : pf_now() + timeout;
}


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
    pf_busy(0);  /* a wait of ours: no heartbeat is due meanwhile */
    r = poll(&p, 1, ms);
    pf_busy(1);
    if (r > 0) return 1;
    if (r < 0 && errno != EINTR) return 1;  /* let the call say why */
  }
}


static void sleepuntil (double deadline) {
  double left = deadline - pf_now();
  struct timespec ts;
  if (left <= 0) return;
  ts.tv_sec = (time_t)left;
  ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
  pf_busy(0);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
  pf_busy(1);
}

/* }====================================================== */


/* {======================================================
** Tasks
** ======================================================= */

static void finish (task *t, int reusable);


/* resume t's coroutine; when it ends (or fails) the task goes */
static void resume (task *t, int nargs) {
  lua_State *co = t->co;
  int nres, st;
  pf_score_running(co);
  st = lua_resume(co, T.L, nargs, &nres);
  pf_score_running(T.L);
  if (st == LUA_YIELD) {
    lua_pop(co, nres);
    if (ev_is_active(&t->io) || ev_is_active(&t->timer)) return;
    pf_log(T.L, "error", "worker %ld: a handler yielded outside a wait "
           "of prefork; its connection is closed", (long)getpid());
  }
  else if (st == LUA_OK)
    lua_pop(co, nres);  /* the handler's results: the coroutine is reusable */
  else {
    luaL_traceback(T.L, co, lua_tostring(co, -1), 0);
    pf_log(T.L, "error", "worker %ld: handler failed: %s", (long)getpid(),
           lua_tostring(T.L, -1));
    lua_pop(T.L, 1);
  }
  finish(t, st == LUA_OK);
}


/* t's wait ended (reason), or it starts */
static void wake (task *t, int reason) {
  int nargs = t->nargs;
  ev_io_stop(T.loop, &t->io);
  ev_timer_stop(T.loop, &t->timer);
  t->reason = reason == PF_TIMEOUT && t->lingering ? PF_STOPPING : reason;
  t->idle = t->lingering = 0;
  t->nargs = 0;
  resume(t, nargs);
}


static void onio (struct ev_loop *loop, ev_io *io, int revents) {
  (void)loop; (void)revents;
  wake((task *)io->data, PF_READY);
}


static void ontimer (struct ev_loop *loop, ev_timer *tm, int revents) {
  task *t = (task *)tm->data;
  (void)loop; (void)revents;
  wake(t, t->io.fd >= 0 ? PF_TIMEOUT : PF_READY);  /* a sleep is done */
}


/* a task with its coroutine: from the pool, or new */
static task *newtask (void) {
  lua_State *L = T.L;
  task *t = T.pool;
  if (t != NULL) {
    T.pool = t->next;
    T.npool--;
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
  t->iosame = 0;
  t->reason = PF_READY;
  t->idle = t->lingering = t->lingered = 0;
  t->prev = NULL;
  return t;
}


static void freetask (task *t) {
  lua_State *L = T.L;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &TASKS);
  lua_pushnil(L);
  lua_rawsetp(L, -2, t->co);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, t->coref);
  free(t);
}


/* the task ended: the object it owns is closed; the task goes, or waits
** in the pool when its coroutine ended well (it can run a new function) */
static void finish (task *t, int reusable) {
  lua_State *L = T.L;
  ev_io_stop(T.loop, &t->io);
  ev_timer_stop(T.loop, &t->timer);
  if (t->objref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->objref);
    if (luaL_callmeta(L, -1, "__close")) lua_pop(L, 1);
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, t->objref);
  }
  if (t->prev) t->prev->next = t->next;
  else T.tasks = t->next;
  if (t->next) t->next->prev = t->prev;
  if (reusable && T.npool < POOLMAX && lua_status(t->co) == LUA_OK
      && lua_gettop(t->co) == 0) {
    t->next = T.pool;
    T.pool = t;
    T.npool++;
  }
  else
    freetask(t);
  if (T.stopping && T.tasks == NULL) ev_break(T.loop, EVBREAK_ALL);
}


/*
** Start a task: the function below nargs arguments on top of L's stack
** (all popped) runs in a coroutine of its own. With own, the task owns
** its first argument (a connection): it is closed when the task ends.
** now: the task runs at once, else from the loop's next turn. 0 without
** memory (the arguments are popped all the same).
*/
int pf_task_spawn (lua_State *L, int nargs, int own, int now) {
  task *t = newtask();
  if (t == NULL) {
    lua_pop(L, nargs + 1);
    return 0;
  }
  t->objref = LUA_NOREF;
  if (own) {
    lua_pushvalue(L, -nargs);
    t->objref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  t->next = T.tasks;
  if (T.tasks) T.tasks->prev = t;
  T.tasks = t;
  lua_xmove(L, t->co, nargs + 1);
  t->nargs = nargs;
  if (now)
    wake(t, PF_READY);
  else {
    ev_timer_set(&t->timer, 0., 0.);
    ev_timer_start(T.loop, &t->timer);
  }
  return 1;
}

/* }====================================================== */


/* {======================================================
** Waiting
** ======================================================= */

/*
** Wait until fd is ready for events or the deadline passes (flags:
** PF_WAITIDLE, PF_WAITSAMEFD). In a task it yields,
** and k(ctx) continues when the loop resumes it (with pf_wakereason
** telling how the wait ended); elsewhere it blocks in poll. fd < 0 is a
** sleep until the deadline. Returns PF_READY, PF_TIMEOUT or PF_STOPPING.
*/
int pf_waitk (lua_State *L, int fd, int events, double deadline, int flags,
              lua_KContext ctx, lua_KFunction k) {
  task *t = findtask(L);
  if (t == NULL || !lua_isyieldable(L)) {
    if (fd >= 0) return pf_waitfd(fd, events, deadline) ? PF_READY
                                                         : PF_TIMEOUT;
    sleepuntil(deadline);
    return PF_READY;
  }
  if ((flags & PF_WAITIDLE) && T.stopping) {  /* a last chance, or none */
    double last = pf_now() + T.linger;
    if (t->lingered || T.linger <= 0) return PF_STOPPING;
    t->lingering = t->lingered = 1;
    if (deadline < 0 || deadline > last)  /* (its own, when shorter) */
      deadline = last;
  }
  t->idle = flags & PF_WAITIDLE;
  setio(t, fd, events, flags & PF_WAITSAMEFD);
  if (fd >= 0) ev_io_start(T.loop, &t->io);
  if (deadline >= 0) {
    double left = deadline - pf_now();
    ev_now_update(T.loop);
    ev_timer_set(&t->timer, left > 0 ? left : 0, 0);
    ev_timer_start(T.loop, &t->timer);
  }
  return lua_yieldk(L, 0, ctx, k);
}


/* is L a task that can wait by yielding? */
int pf_intask (lua_State *L) {
  return lua_isyieldable(L) && findtask(L) != NULL;
}


/* how the last wait of L ended */
int pf_wakereason (lua_State *L) {
  task *t = findtask(L);
  return t != NULL ? t->reason : PF_READY;
}

/* }====================================================== */


/* {======================================================
** The loop
** ======================================================= */

static void onidle (struct ev_loop *loop, ev_prepare *w, int revents) {
  (void)loop; (void)w; (void)revents;
  pf_busy(0);
}


static void onbusy (struct ev_loop *loop, ev_check *w, int revents) {
  (void)loop; (void)w; (void)revents;
  pf_busy(1);
}


/* a new loop for the tasks of thread L; NULL (with a message pushed)
** when one runs already or libev cannot make one */
struct ev_loop *pf_task_open (lua_State *L) {
  if (T.running) {
    lua_pushliteral(L, "a loop runs already");
    return NULL;
  }
  T.loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (T.loop == NULL) {
    lua_pushliteral(L, "libev cannot make a loop");
    return NULL;
  }
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &TASKS);
  T.L = L;
  T.running = 1;
  T.stopping = 0;
  ev_prepare_init(&T.idle, onidle);
  ev_check_init(&T.busy, onbusy);
  ev_prepare_start(T.loop, &T.idle);
  ev_check_start(T.loop, &T.busy);
  ev_unref(T.loop);  /* neither keeps the loop running */
  ev_unref(T.loop);
  return T.loop;
}


/* run the loop until a stop has seen every task end */
void pf_task_run (void) {
  if (!T.stopping || T.tasks != NULL) ev_run(T.loop, 0);
}


/* t waits idle: it gets the linger (or what is left of its own time, if
** less), then PF_STOPPING */
static void lastchance (task *t) {
  double left = ev_is_active(&t->timer) ? ev_timer_remaining(T.loop, &t->timer)
                                        : T.linger;
  t->lingering = t->lingered = 1;
  ev_timer_stop(T.loop, &t->timer);
  ev_timer_set(&t->timer, left < T.linger ? left : T.linger, 0);
  ev_timer_start(T.loop, &t->timer);
}


/* idle waits end with PF_STOPPING after a last chance of linger seconds
** (new ones too); the loop ends once no task is left */
void pf_task_stop (double linger) {
  task *t, *next;
  T.stopping = 1;
  T.linger = linger;
  for (t = T.tasks; t != NULL; t = next) {
    next = t->next;
    if (!t->idle) continue;
    if (linger > 0) lastchance(t);
    else wake(t, PF_STOPPING);
  }
  if (T.tasks == NULL) ev_break(T.loop, EVBREAK_ALL);
}


int pf_task_stopping (void) {
  return T.stopping;
}


/* after the run: the kept coroutines and the loop go */
void pf_task_close (void) {
  T.running = T.stopping = 0;
  ev_ref(T.loop);
  ev_ref(T.loop);
  ev_prepare_stop(T.loop, &T.idle);
  ev_check_stop(T.loop, &T.busy);
  while (T.pool != NULL) {
    task *t = T.pool;
    T.pool = t->next;
    freetask(t);
  }
  T.npool = 0;
  ev_loop_destroy(T.loop);
  T.loop = NULL;
  T.L = NULL;
}


/* in a new child: the copy of a running loop goes, with its fds */
void pf_task_forget (void) {
  if (!T.running) return;
  ev_loop_destroy(T.loop);
  memset(&T, 0, sizeof(T));
}

/* }====================================================== */


/* {======================================================
** Lua functions
** ======================================================= */

/* the results of a finished wait: true, or nil, "timeout", ETIMEDOUT, or
** (an idle wait at a stop) nil, "stopping", ECANCELED */
int pf_pushwait (lua_State *L, int how) {
  if (how == PF_TIMEOUT) return pf_failwith(L, "timeout", ETIMEDOUT);
  if (how == PF_STOPPING) return pf_failwith(L, "stopping", ECANCELED);
  lua_pushboolean(L, 1);
  return 1;
}


static int sleep_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  return pf_pushwait(L, pf_wakereason(L));
}


/* prefork.sleep(seconds) -> true; yields in a task */
static int l_sleep (lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0, 1, "seconds must be a number >= 0");
  return pf_pushwait(L, pf_waitk(L, -1, 0, pf_now() + s, 0, 0, sleep_k));
}


/*
** core.run(fn): run fn() in a task on a loop of its own, with no
** listeners, until it and every task it started with core.go have ended
** (the async pool worker). Returns true.
*/
static int l_run (lua_State *L) {
  int ok;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  if (pf_task_open(L) == NULL)
    return luaL_error(L, "run: %s", lua_tostring(L, -1));
  lua_pushvalue(L, 1);
  ok = pf_task_spawn(L, 0, 0, 1);
  if (ok) pf_task_run();
  pf_task_close();
  if (!ok) return luaL_error(L, "not enough memory");
  lua_pushboolean(L, 1);
  return 1;
}


/* core.go(fn): while a loop runs, run fn() in a new task of its own,
** from the loop's next turn */
static int l_go (lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (!T.running)
    return luaL_error(L, "go: only inside worker:serve or a pool worker");
  lua_settop(L, 1);
  if (!pf_task_spawn(L, 0, 0, 0))
    return luaL_error(L, "not enough memory");
  lua_pushboolean(L, 1);
  return 1;
}


void pf_open_task (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"sleep", l_sleep},
    {"run", l_run},
    {"go", l_go},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}

/* }====================================================== */
