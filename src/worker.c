/*
** worker.c: the worker side of a master: the stop flag that TERM sets,
** readiness, the counters the master reads from the shared scoreboard,
** worker:accept (which blocks until a connection comes: the strategies
** themselves are accept.c's), and the worker's two ways out when it
** cannot stop by itself:
**
**  - timed out: the master sends PF_SIGTIMEOUT to a worker that stopped
**    beating; its handler sets a Lua hook, which logs where the worker
**    is (a traceback) and exits. A worker stuck in C or a system call
**    runs no hook: the master KILLs it a second later.
**  - orphaned: the worker gets PF_SIGDOOM when its master dies
**    (PR_SET_PDEATHSIG). It stops as on TERM, and a second later the
**    same signal, from a timer, KILLs its process group: busy or not,
**    the worker and what it started are gone.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "prefork.h"


/* One process is at most one worker: its state is the process's. */
static struct {
  volatile sig_atomic_t stopping;  /* TERM or INT came */
  volatile sig_atomic_t doomed;  /* the master is gone */
  int inworker;  /* this process is a master's worker */
  int wake[2];  /* self-pipe: the stop handler writes, accept polls */
  int ctl;  /* socket to the master: readiness, recycling */
  int channel;  /* accept = "master": connections come on ctl */
  int ep;  /* what accept waits on: an epoll set (listeners EPOLLEXCLUSIVE) */
  int told;  /* the master knows we are ready */
  int ours;  /* it accepts with worker:accept or serve, not a loop of its own */
  int dead;  /* a socket whose peer is gone: what the listeners become at a
             ** stop, for a loop of the worker's own (see onstop) */
  int due;  /* the master knows we served our max_requests */
  pf_score *score;  /* our slot of the master's scoreboard */
  struct pollfd *pfd;  /* the listeners (or ctl), then wake[0] */
  int npfd;  /* the listeners' */
  timer_t doom;  /* fires PF_SIGDOOM a second after the master died */
  char name[40];  /* our id, for the log */
  unsigned long failures;  /* accept failures in a row (an episode) */
} self = {.wake = {-1, -1}, .ctl = -1, .ep = -1, .dead = -1};


static void wakeup (void) {
  if (self.wake[1] >= 0)
    (void)!write(self.wake[1], "", 1);
}


/*
** TERM or INT. A worker with a loop of its own (LuaSocket's accept on
** worker.listeners, say) that waits for a connection would never see
** the stop: its listeners are shared and stay open. So here each one's
** fd becomes a socket whose peer is gone, in this process only: the
** interrupted poll, made again on the same fd, returns at once, and the
** accept that follows fails (EINVAL); the loop looks at
** worker:stopping(). The master and the other workers keep the
** listening socket. (Not for our own loops: their epoll sets hold the
** listeners, and they stop by themselves.)
*/
static void onstop (int sig) {
  int en = errno, i;
  (void)sig;
  self.stopping = 1;
  wakeup();
  for (i = 0; i < self.npfd && !self.ours && !self.channel
              && self.dead >= 0; i++)
    dup2(self.dead, self.pfd[i].fd);
  errno = en;
}


/* USR1: the log file again (logrotate moved it) */
static void onusr1 (int sig) {
  int en = errno;
  (void)sig;
  pf_log_reopen();
  errno = en;
}


/* the master died: stop as on TERM; a second later (the timer's signal)
** the worker's process group goes */
static void ondoom (int sig) {
  int en = errno;
  struct itimerspec its;
  (void)sig;
  if (self.doomed)
    kill(0, SIGKILL);
  self.doomed = self.stopping = 1;
  wakeup();
  memset(&its, 0, sizeof(its));
  its.it_value.tv_sec = 1;
  timer_settime(self.doom, 0, &its, NULL);
  errno = en;
}


/* {------------------------------------------------------
** Timed out: a hook logs where the worker hangs, and it exits
** ------------------------------------------------------- */

static void timedout (lua_State *L, lua_Debug *ar) {
  pf_score *s = pf_score_mine();
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_traceback(L, L, NULL, 0);
  pf_log(L, "error", "worker %s (pid %ld) timed out after %.3gs: %s",
         self.name, (long)getpid(), s != NULL ? (double)s->hung / 1000 : 0.0,
         lua_tostring(L, -1));
  pf_exit(PF_EXIT_TIMEDOUT);
}


/* the master says we hang: unless we left our busy spell meanwhile, the
** hook ends the Lua code that runs */
static void ontimeout (int sig) {
  pf_score *s = pf_score_mine();
  lua_State *L = pf_score_current();
  (void)sig;
  if (s != NULL && L != NULL && __atomic_load_n(&s->busy, __ATOMIC_SEQ_CST))
    lua_sethook(L, timedout, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* }------------------------------------------------------ */


/* in a process a worker forks: it is no worker, and holds none of its
** pipes (a held readiness pipe would tell the master nothing) */
static void forget (void *ud) {
  (void)ud;
  if (self.ctl >= 0) close(self.ctl);
  if (self.ep >= 0) close(self.ep);
  if (self.dead >= 0) close(self.dead);
  self.dead = -1;
  pf_accept_forget();  /* or it could hold the lock */
  pf_score_unbind();
  close(self.wake[0]);
  close(self.wake[1]);
  self.ctl = self.ep = self.wake[0] = self.wake[1] = -1;
  self.inworker = 0;
  self.score = NULL;
}


/* the epoll set accept waits on: a connection wakes one waiting worker,
** not all (EPOLLEXCLUSIVE; under "mutex" the lock holder alone waits);
** the stop pipe wakes every one. -1: poll(2) will do. */
static int waitset (int mode) {
  int i, ep = epoll_create1(EPOLL_CLOEXEC);
  for (i = 0; i <= self.npfd && ep >= 0; i++) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | (i < self.npfd && mode != PF_ACCEPT_MUTEX
                           ? EPOLLEXCLUSIVE : 0);
    ev.data.fd = self.pfd[i].fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, self.pfd[i].fd, &ev) != 0) {
      close(ep);
      ep = -1;
    }
  }
  return ep;
}


/* what accept waits on: the listeners (or the master's channel) and the
** stop pipe; exits without memory */
static void waitfds (const pf_workerspec *spec) {
  int i, fds2[2], *fds = (int *)calloc((size_t)spec->nls + 2, sizeof(int));
  self.pfd = (struct pollfd *)calloc((size_t)spec->nls + 2,
                                     sizeof(struct pollfd));
  if (self.pfd == NULL || fds == NULL
      || pipe2(self.wake, O_CLOEXEC | O_NONBLOCK) != 0)
    pf_exit(111);
  self.npfd = pf_accept_fds(fds);
  for (i = 0; i < self.npfd; i++) self.pfd[i].fd = fds[i];
  free(fds);
  self.pfd[self.npfd].fd = self.wake[0];
  for (i = 0; i <= self.npfd; i++) self.pfd[i].events = POLLIN;
  self.ep = waitset(spec->mode);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds2) == 0) {
    close(fds2[1]);
    self.dead = fds2[0];
  }
}


/* TERM and INT set the stop flag (a worker busy outside accept finishes
** its work); the master's timeout signal; USR1; the master's death */
static void handlers (pid_t master) {
  struct sigaction sa;
  struct sigevent sev;
  memset(&sa, 0, sizeof(sa));
  sa.sa_flags = SA_RESTART;  /* the work in hand goes on */
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = onstop;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sa.sa_handler = ontimeout;
  sigaction(PF_SIGTIMEOUT, &sa, NULL);
  sa.sa_handler = onusr1;
  sigaction(SIGUSR1, &sa, NULL);
  sa.sa_handler = ondoom;
  sigaction(PF_SIGDOOM, &sa, NULL);
  memset(&sev, 0, sizeof(sev));
  sev.sigev_notify = SIGEV_SIGNAL;
  sev.sigev_signo = PF_SIGDOOM;
  if (timer_create(CLOCK_MONOTONIC, &sev, &self.doom) != 0)
    pf_exit(111);
  prctl(PR_SET_PDEATHSIG, PF_SIGDOOM);
  if (getppid() != master)  /* it died before prctl */
    raise(PF_SIGDOOM);
}


/* In a new worker, with signals still blocked (they are unblocked once
** its body runs): what it accepts from, its slot and watchdog, signals */
void pf_worker_setup (const pf_workerspec *spec) {
  self.inworker = 1;
  self.ctl = spec->ctl;
  self.channel = spec->mode == PF_ACCEPT_MASTER;
  self.score = spec->score;
  snprintf(self.name, sizeof(self.name), "%s", spec->name);
  pf_accept_setup(spec->ls, spec->nls, spec->ctl, spec->mode);
  waitfds(spec);
  pf_score_bind(spec->board, spec->score, spec->watchdog, spec->timeout);
  pf_score_running(spec->L);
  handlers(spec->master);
  pf_onfork(forget, NULL);
}


/* a standby set up ahead becomes the worker of that name */
void pf_worker_rename (const char *name) {
  snprintf(self.name, sizeof(self.name), "%s", name);
}


/* the first accept (or worker:ready, worker:beat) tells the master that
** this worker is ready */
static void ready (void) {
  if (self.ctl >= 0 && !self.told) {
    (void)!write(self.ctl, "r", 1);
    self.told = 1;
  }
}


/* served (requests) more: once past its max_requests, the worker tells
** the master, which recycles it */
static void count (unsigned long n) {
  unsigned long r;
  if (self.score == NULL) return;
  r = self.score->requests + n;
  pf_add(self.score->requests, n);
  if (self.score->limit > 0 && r >= self.score->limit && !self.due
      && self.ctl >= 0) {
    (void)!write(self.ctl, "m", 1);
    self.due = 1;
  }
}


void pf_worker_ready (void) {
  ready();
}


/* the blocking accept's epoll set goes: serve watches the listeners on a
** loop of its own (the set's entries would sit in the listeners' wait
** queues for nobody; an accept from now on waits in poll) */
void pf_worker_dropwaitset (void) {
  if (self.ep >= 0) close(self.ep);
  self.ep = -1;
}


/* the worker stops accepting: the listeners close, and what watched them */
void pf_worker_stoplistening (void) {
  pf_worker_dropwaitset();
  pf_accept_close();
}


/* take one connection into c, never blocking, and count it: 1, 0 none
** there, -1 with errno */
int pf_worker_accept (pf_conn *c) {
  int gone = 0, st = pf_accept_round(c, &gone);
  if (gone) self.stopping = 1;
  if (st > 0) {
    pf_beat();
    c->counter = &self.score->inflight;
    pf_add(self.score->accepted, 1);
    pf_add(self.score->inflight, 1);
    count(1);
  }
  return st;
}


/* {------------------------------------------------------
** Accept failures (EMFILE, say) make the worker pause accepting for
** PF_ACCEPTPAUSE seconds, as nginx does, instead of spinning; an episode
** of failures in a row is logged once, and once more when it ends.
** ------------------------------------------------------- */

/* an accept failed with en */
void pf_worker_acceptfailed (lua_State *L, int en) {
  if (self.failures++ == 0)
    pf_log(L, "error", "worker %s (pid %ld): accept: %s; it pauses %.3gs "
           "after each failure until one works", self.name, (long)getpid(),
           strerror(en), PF_ACCEPTPAUSE);
}


/* an accept worked */
void pf_worker_acceptworked (lua_State *L) {
  unsigned long n = self.failures;
  if (n == 0) return;
  self.failures = 0;
  pf_log(L, "info", "worker %s (pid %ld): accept works again, after %lu "
         "failure%s", self.name, (long)getpid(), n, n == 1 ? "" : "s");
}


/* pause accepting (idle), unless a stop comes */
static void acceptpause (void) {
  struct timespec ts;
  ts.tv_sec = (time_t)PF_ACCEPTPAUSE;
  ts.tv_nsec = (long)((PF_ACCEPTPAUSE - (double)ts.tv_sec) * 1e9);
  if (!self.stopping) nanosleep(&ts, NULL);  /* (TERM ends it: EINTR) */
}

/* }------------------------------------------------------ */


/* accept = "mutex": wait for the lock; TERM and INT interrupt the wait
** (and only it), so that a stopping worker does not queue for the lock.
** 0 held, -1 not. */
static int lockwait (void) {
  struct sigaction sa, old1, old2;
  int r;
  if (pf_accept_lock(0) == 0) return 0;  /* held, or no lock to take */
  sa.sa_handler = onstop;
  sa.sa_flags = 0;  /* no SA_RESTART: flock returns EINTR */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old1);
  sigaction(SIGINT, &sa, &old2);
  r = self.stopping ? -1 : pf_accept_lock(1);
  sigaction(SIGTERM, &old1, NULL);
  sigaction(SIGINT, &old2, NULL);
  return r;
}


/* wait until a listener (or the stop pipe) is readable: 0, or -1 with
** the name of the call that failed */
static int waitready (const char **what) {
  char drain[64];
  int r, en;
  if (self.ep >= 0) {
    struct epoll_event evs[4];
    *what = "epoll_wait";
    r = epoll_wait(self.ep, evs, 4, -1);
  }
  else {
    *what = "poll";
    r = poll(self.pfd, (nfds_t)self.npfd + 1, -1);
  }
  en = errno;
  while (read(self.wake[0], drain, sizeof(drain)) > 0) {}
  errno = en;
  return r < 0 && en != EINTR ? -1 : 0;
}


/* a stopping worker takes what waits for it alone; then nil, "stopping" */
static int stopped (lua_State *L, pf_conn *c) {
  pf_accept_unlock();
  if (pf_accept_drains() && pf_worker_accept(c) > 0) {
    pf_accept_drained();
    return 1;  /* handed over, or queued on our own socket: served */
  }
  pf_worker_stoplistening();
  return pf_failwith(L, "stopping", ECANCELED);
}


/*
** worker:accept() -> conn | nil, "stopping" | nil, "epoll_wait: err", errno
** Blocks until a connection comes on any listener or a stop begins; at
** the stop the worker's listeners are closed. While it waits the worker
** is idle (no heartbeat is due). An accept that fails (EMFILE, say) is
** logged and tried again after a pause.
*/
static int l_accept (lua_State *L) {
  pf_conn *c;
  const char *what;
  int st = 0;
  if (!self.inworker)
    return luaL_error(L, "accept: not in a worker process");
  self.ours = 1;
  ready();
  c = pf_newconn(L);
  pf_busy(0);
  while (!self.stopping && st <= 0) {
    if (lockwait() != 0) continue;
    st = pf_worker_accept(c);
    if (st != 0) pf_accept_unlock();
    if (st < 0) {  /* EMFILE, say: pause, then again */
      pf_worker_acceptfailed(L, errno);
      acceptpause();
    }
    else if (st == 0 && waitready(&what) != 0)
      return pf_fail(L, what);
  }
  pf_busy(1);
  if (st == 1) {
    pf_worker_acceptworked(L);
    return 1;
  }
  return stopped(L, c);
}


/* the listeners' fds (n of them) then the stop pipe's read end; NULL
** outside a worker */
const struct pollfd *pf_worker_fds (int *n) {
  *n = self.npfd;
  self.ours = self.inworker;
  return self.inworker ? self.pfd : NULL;
}


/* 1 once a stop began; empties the stop pipe */
int pf_worker_stopping (void) {
  char drain[64];
  while (self.wake[0] >= 0 && read(self.wake[0], drain, sizeof(drain)) > 0) {}
  return self.stopping != 0;
}


/* worker:stopping() -> true once a graceful stop began */
static int l_stopping (lua_State *L) {
  lua_pushboolean(L, self.stopping);
  return 1;
}


/* worker:ready(): a worker with a loop of its own says it is ready (the
** master waits for this before a replacement takes over) */
static int l_ready (lua_State *L) {
  ready();
  lua_pushboolean(L, self.inworker);
  return 1;
}


/* worker:beat(): a heartbeat, from a long computation or a loop of the
** worker's own (the worker is busy: it must beat within `timeout`) */
static int l_beat (lua_State *L) {
  ready();
  pf_busy(1);
  lua_pushboolean(L, self.inworker);
  return 1;
}


/* worker:count([n]): n requests more (default 1) than the connections
** (each counts one): for max_requests and the statistics */
static int l_count (lua_State *L) {
  lua_Integer n = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, n >= 0, 2, "negative count");
  count((unsigned long)n);
  lua_pushboolean(L, self.inworker);
  return 1;
}


void pf_open_worker (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"accept", l_accept},
    {"stopping", l_stopping},
    {"ready", l_ready},
    {"beat", l_beat},
    {"count", l_count},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
