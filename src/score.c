/*
** score.c: the scoreboard, shared memory between a master and its
** workers (a slot each), and a worker's heartbeat in its slot.
**
** The heartbeat costs no system call: a worker stamps its slot with a
** coarse clock (read from the vDSO) as its loop turns, as it accepts,
** as a connection's read or write returns, and on worker:beat(). It
** also marks when it leaves an idle wait (busy) and when it enters one.
** When it leaves one and its watchdog is not armed, it arms it: a
** timerfd that the master made and watches. The master wakes only when
** a watchdog expires (never while every worker is idle): it finds a
** worker idle (the watchdog stays disarmed), making progress (armed
** again for the rest), or hung.
**
** A disarm races with a worker leaving its idle wait; each side writes
** its own flag, then reads the other's (sequentially consistent), so at
** least one of them sees the other and arms again (pf_score_disarm).
**
** The balance of the shared listeners: a serve worker marks its slot
** accepting while it waits on them, and asks after each connection it
** takes whether it is ahead: holding clearly more connections than a
** sibling that serves and turns its loop (it sleeps in its idle wait, or
** its heartbeat is fresh: a hung one is no sibling to wait for). If so
** it leaves their queues for a moment (serve.c), marked resting, when
** another takes the next connections: one that accepts, or one that rests
** with clearly fewer (it comes back as its loop turns). It marks itself
** first, then looks (sequentially consistent, as above), so when two
** leave at once at least one of them sees the other.
*/

#include <string.h>
#include <time.h>
#include <sys/timerfd.h>

#include "prefork.h"


/* this process's slot, when it is a supervised worker */
static struct {
  pf_board *board;  /* the master's scoreboard */
  pf_score *slot;
  int watchdog;  /* the timerfd; -1 none */
  double timeout;  /* seconds; <= 0: no watchdog while running */
  lua_State *volatile running;  /* the thread running Lua code now */
} me = {NULL, NULL, -1, 0, NULL};


/* monotonic seconds of a coarse clock (no system call: the vDSO) */
double pf_coarse (void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}


/* the coarse clock in ms, as a slot keeps it */
static long coarsems (void) {
  return (long)(pf_coarse() * 1000.0);
}


/* the last heartbeat in slot s, in pf_coarse's seconds */
double pf_score_beat (const pf_score *s) {
  return (double)__atomic_load_n(&s->beat, __ATOMIC_RELAXED) / 1000.0;
}


/* arm the timerfd fd to expire in secs (0: disarm it) */
void pf_score_arm (int fd, double secs) {
  struct itimerspec its;
  memset(&its, 0, sizeof(its));
  if (secs > 0 && secs < 0.001) secs = 0.001;
  its.it_value.tv_sec = (time_t)secs;
  its.it_value.tv_nsec = (long)((secs - (double)its.it_value.tv_sec) * 1e9);
  (void)timerfd_settime(fd, 0, &its, NULL);
}


/* {======================================================
** The worker's side
** ======================================================= */

/* this process is the worker of slot s of board b: its watchdog fd, its
** timeout */
void pf_score_bind (pf_board *b, pf_score *s, int watchdog, double timeout) {
  me.board = b;
  me.slot = s;
  me.watchdog = watchdog;
  me.timeout = timeout;
}


/* a process the worker forks is none: it has no slot */
void pf_score_unbind (void) {
  me.board = NULL;
  me.slot = NULL;
  me.watchdog = -1;
}


pf_score *pf_score_mine (void) {
  return me.slot;
}


/* the thread that runs Lua code now (the task scheduler sets it) */
void pf_score_running (lua_State *L) {
  me.running = L;
}


lua_State *pf_score_current (void) {
  return me.running;
}


/* a heartbeat: the worker makes progress */
void pf_beat (void) {
  if (me.slot != NULL)
    __atomic_store_n(&me.slot->beat, coarsems(), __ATOMIC_RELAXED);
}


/* the worker leaves an idle wait (busy 1: from now on it must beat) or
** enters one (0) */
void pf_busy (int busy) {
  pf_score *s = me.slot;
  if (s == NULL) return;
  if (!busy) {
    __atomic_store_n(&s->busy, 0, __ATOMIC_SEQ_CST);
    return;
  }
  __atomic_store_n(&s->beat, coarsems(), __ATOMIC_RELAXED);
  __atomic_store_n(&s->busy, 1, __ATOMIC_SEQ_CST);
  if (me.timeout > 0 && !__atomic_load_n(&s->armed, __ATOMIC_SEQ_CST)) {
    __atomic_store_n(&s->armed, 1, __ATOMIC_SEQ_CST);
    pf_score_arm(me.watchdog, me.timeout);
  }
}


/* serve waits on the shared listeners (PF_ACCEPTING), left their queues
** for a moment (PF_RESTING), or serves no more (0) */
void pf_score_accepting (int state) {
  if (me.slot != NULL)
    __atomic_store_n(&me.slot->accepting, state, __ATOMIC_SEQ_CST);
}


/* ms of the coarse clock within which a busy sibling's heartbeat shows
** it turning its loop (a hung one stops beating) */
#define FRESH	20

/* what a worker sees of its siblings in serve */
typedef struct siblings {
  long least;  /* the fewest connections of a live one; -1 when none is */
  long leastresting;  /* the same of those that rest */
  int accepting;  /* one accepts */
  int idle;  /* one accepts and sleeps in its idle wait */
} siblings;


static void fewer (long *least, long n) {
  if (*least < 0 || n < *least) *least = n;
}


/* the siblings, through the slots in use; a live one turns its loop: it
** sleeps in its idle wait, or it beat lately */
static void look (siblings *v) {
  long now = coarsems();
  int i, top = __atomic_load_n(&me.board->top, __ATOMIC_RELAXED);
  v->least = v->leastresting = -1;
  v->accepting = v->idle = 0;
  for (i = 0; i < top && i < PF_MAXPROCS; i++) {
    pf_score *o = &me.board->slot[i];
    int st, busy;
    long n;
    if (o == me.slot
        || (st = __atomic_load_n(&o->accepting, __ATOMIC_SEQ_CST)) == 0)
      continue;
    busy = __atomic_load_n(&o->busy, __ATOMIC_RELAXED);
    n = __atomic_load_n(&o->inflight, __ATOMIC_RELAXED);
    if (st == PF_ACCEPTING) {
      v->accepting = 1;
      v->idle |= !busy;
    }
    if (!busy || now - __atomic_load_n(&o->beat, __ATOMIC_RELAXED) <= FRESH) {
      fewer(&v->least, n);
      if (st == PF_RESTING) fewer(&v->leastresting, n);
    }
  }
}


/* m is clearly more than n connections: more than n, plus one, plus an
** eighth */
static int morethan (long m, long n) {
  return n >= 0 && m > n + 1 + n / 8;
}


static long mine (void) {
  return __atomic_load_n(&me.slot->inflight, __ATOMIC_RELAXED);
}


/* another worker takes the next connections: one accepts, or one that
** rests holds clearly fewer than this one (it comes back as its loop
** turns) */
static int another (const siblings *v) {
  return v->accepting || morethan(mine(), v->leastresting);
}


static int bound (void) {
  return me.slot != NULL && me.board != NULL;
}


/* a sibling that accepts sleeps in its idle wait: the kernel wakes it for
** the next connection */
int pf_score_idle (void) {
  siblings v;
  if (!bound()) return 0;
  look(&v);
  return v.idle;
}


/* this worker holds clearly more connections than a live sibling */
int pf_score_ahead (void) {
  siblings v;
  if (!bound()) return 0;
  look(&v);
  return morethan(mine(), v.least);
}


/* this worker stops accepting, unless no other takes the next
** connections: 1 when it did */
int pf_score_leave (void) {
  siblings v;
  if (!bound()) return 0;
  pf_score_accepting(PF_RESTING);
  look(&v);
  if (another(&v)) return 1;
  pf_score_accepting(PF_ACCEPTING);  /* the others left at the same time */
  return 0;
}


/* a worker that left may stay out: it is still ahead, and another takes
** the next connections */
int pf_score_stayout (void) {
  siblings v;
  if (!bound()) return 0;
  look(&v);
  return morethan(mine(), v.least) && another(&v);
}

/* }====================================================== */


/* {======================================================
** The master's side
** ======================================================= */

/* a fresh slot for a new worker: busy from its fork (it boots) */
void pf_score_init (pf_score *s) {
  memset(s, 0, sizeof(*s));
  s->beat = coarsems();
  s->busy = 1;
}


/* the watchdog of slot s expired and the worker is idle: it disarms,
** unless the worker left its idle wait meanwhile. 1: it is disarmed. */
int pf_score_disarm (pf_score *s) {
  __atomic_store_n(&s->armed, 0, __ATOMIC_SEQ_CST);
  if (!__atomic_load_n(&s->busy, __ATOMIC_SEQ_CST)) return 1;
  __atomic_store_n(&s->armed, 1, __ATOMIC_SEQ_CST);
  return 0;
}

/* }====================================================== */
