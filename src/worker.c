/*
** worker.c: the worker side of a master: the stop flag that TERM sets,
** readiness, the counters the master reads from the shared scoreboard,
** and worker:accept, which blocks until a connection comes (the accept
** strategies themselves are accept.c's).
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/prctl.h>

#include "prefork.h"


/* One process is at most one worker: its state is the process's. */
static struct {
  volatile sig_atomic_t stopping;  /* TERM or INT came */
  int inworker;  /* this process is a master's worker */
  int wake[2];  /* self-pipe: the stop handler writes, accept polls */
  int ctl;  /* socket to the master: readiness; -1 once told */
  int channel;  /* accept = "master": connections come on ctl */
  int ep;  /* what accept waits on: an epoll set (listeners EPOLLEXCLUSIVE) */
  int told;  /* the master knows we are ready */
  pf_score *score;  /* our slot of the master's scoreboard */
  struct pollfd *pfd;  /* the listeners (or ctl), then wake[0] */
  int npfd;  /* the listeners' */
} self = {0, 0, {-1, -1}, -1, 0, -1, 0, NULL, NULL, 0};


static void onstop (int sig) {
  int en = errno;
  (void)sig;
  self.stopping = 1;
  if (self.wake[1] >= 0)
    (void)!write(self.wake[1], "", 1);
  errno = en;
}


/* in a process a worker forks: it is no worker, and holds none of its
** pipes (a held readiness pipe would tell the master nothing) */
static void forget (void *ud) {
  (void)ud;
  if (self.ctl >= 0) close(self.ctl);
  if (self.ep >= 0) close(self.ep);
  pf_accept_forget();  /* or it could hold the lock */
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


/*
** In a new worker, with signals still blocked: the listeners ls (n of
** them) or the master's channel ctl to accept from, the score slot;
** TERM and INT set the stop flag (a worker busy outside accept finishes
** its work), and the worker gets TERM when the master dies.
*/
void pf_worker_setup (pf_listener **ls, int nls, int ctl, int mode,
                      pf_score *score, pid_t master) {
  struct sigaction sa;
  int i, *fds;
  self.inworker = 1;
  self.ctl = ctl;
  self.channel = mode == PF_ACCEPT_MASTER;
  self.score = score;
  pf_accept_setup(ls, nls, ctl, mode);
  self.pfd = (struct pollfd *)calloc((size_t)nls + 2, sizeof(struct pollfd));
  fds = (int *)calloc((size_t)nls + 2, sizeof(int));
  if (self.pfd == NULL || fds == NULL
      || pipe2(self.wake, O_CLOEXEC | O_NONBLOCK) != 0)
    pf_exit(111);
  self.npfd = pf_accept_fds(fds);
  for (i = 0; i < self.npfd; i++) self.pfd[i].fd = fds[i];
  free(fds);
  self.pfd[self.npfd].fd = self.wake[0];
  for (i = 0; i <= self.npfd; i++) self.pfd[i].events = POLLIN;
  self.ep = waitset(mode);
  sa.sa_handler = onstop;
  sa.sa_flags = SA_RESTART;  /* the work in hand goes on */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (getppid() != master)  /* it died before prctl */
    self.stopping = 1;
  pf_onfork(forget, NULL);
}


/* the first accept tells the master that this worker is ready */
void pf_worker_ready (void) {
  if (self.ctl >= 0 && !self.told) {
    (void)!write(self.ctl, "r", 1);
    self.told = 1;
    if (!self.channel) {  /* it says nothing more */
      close(self.ctl);
      self.ctl = -1;
    }
  }
}


/* the worker stops accepting: the listeners close, and what watched them */
void pf_worker_stoplistening (void) {
  if (self.ep >= 0) close(self.ep);
  self.ep = -1;
  pf_accept_close();
}


/* take one connection into c, never blocking, and count it: 1, 0 none
** there, -1 with errno */
int pf_worker_accept (pf_conn *c) {
  int gone = 0, st = pf_accept_round(c, &gone);
  if (gone) self.stopping = 1;
  if (st > 0) {
    c->counter = &self.score->inflight;
    pf_add(self.score->accepted, 1);
    pf_add(self.score->inflight, 1);
  }
  return st;
}


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
  int r;
  if (self.ep >= 0) {
    struct epoll_event evs[4];
    *what = "epoll_wait";
    r = epoll_wait(self.ep, evs, 4, -1);
  }
  else {
    *what = "poll";
    r = poll(self.pfd, (nfds_t)self.npfd + 1, -1);
  }
  while (read(self.wake[0], drain, sizeof(drain)) > 0) {}
  return r < 0 && errno != EINTR ? -1 : 0;
}


/*
** worker:accept() -> conn | nil, "stopping" | nil, "accept: err", errno
** Blocks until a connection comes on any listener or a stop begins; at
** the stop the worker's listeners are closed.
*/
static int l_accept (lua_State *L) {
  pf_conn *c;
  const char *what;
  if (!self.inworker)
    return luaL_error(L, "accept: not in a worker process");
  pf_worker_ready();
  c = pf_newconn(L);
  while (!self.stopping) {
    int st;
    if (lockwait() != 0) continue;
    st = pf_worker_accept(c);
    if (st != 0) pf_accept_unlock();
    if (st > 0) return 1;
    if (st < 0) return pf_fail(L, "accept");
    if (waitready(&what) != 0) return pf_fail(L, what);
  }
  pf_accept_unlock();
  if (pf_accept_drains() && pf_worker_accept(c) > 0) {
    pf_accept_drained();
    return 1;  /* handed over, or queued on our own socket: served */
  }
  pf_worker_stoplistening();
  return pf_failwith(L, "stopping", ECANCELED);
}


/* the listeners' fds (n of them) then the stop pipe's read end; NULL
** outside a worker */
const struct pollfd *pf_worker_fds (int *n) {
  *n = self.npfd;
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


void pf_open_worker (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"accept", l_accept},
    {"stopping", l_stopping},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
