/*
** worker.c: the worker side of a master: the stop flag that TERM sets,
** accept over the inherited listeners, readiness, and the counters the
** master reads from the shared scoreboard.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "prefork.h"


/* One process is at most one worker: its state is the process's. */
static struct {
  volatile sig_atomic_t stopping;  /* TERM or INT came */
  int inworker;  /* this process is a master's worker */
  int wake[2];  /* self-pipe: the stop handler writes, accept polls */
  int ctl;  /* socket to the master: readiness; -1 once told */
  int channel;  /* accept = "master": connections come on ctl */
  int mode;  /* PF_SHARED, PF_CHANNEL or PF_OWN */
  int drained;  /* connections taken after the stop began */
  int lockfd;  /* accept = "mutex": the lock file, opened by this worker */
  int ep;  /* what accept waits on: an epoll set (listeners EPOLLEXCLUSIVE) */
  int locked;  /* accept holds the lock */
  int told;  /* the master knows we are ready */
  pf_score *score;  /* our slot of the master's scoreboard */
  pf_listener **ls;  /* the inherited listeners */
  int nls;
  int next;  /* listener to try first: none is starved */
  struct pollfd *pfd;  /* the listeners (or ctl) and wake[0] */
} self = {0, 0, {-1, -1}, -1, 0, 0, 0, 0, -1, -1, 0, NULL, NULL, 0, 0, NULL};


/* a counter in shared memory: one writer (us), read by the master */
#define bump(p, d)  __atomic_store_n(&(p), __atomic_load_n(&(p), \
                      __ATOMIC_RELAXED) + (d), __ATOMIC_RELAXED)


static void onstop (int sig) {
  int en = errno;
  (void)sig;
  self.stopping = 1;
  if (self.wake[1] >= 0)
    (void)!write(self.wake[1], "", 1);
  errno = en;
}


/*
** In a new worker, with signals still blocked: TERM and INT set the stop
** flag (a worker busy outside accept finishes its work), the worker gets
** TERM when the master dies, and accept watches the listeners.
*/
/* in a process a worker forks: it is no worker, and holds none of its
** pipes (a held readiness pipe would tell the master nothing) */
static void forget (void *ud) {
  (void)ud;
  if (self.ctl >= 0) close(self.ctl);
  if (self.lockfd >= 0) close(self.lockfd);  /* or it could hold the lock */
  if (self.ep >= 0) close(self.ep);
  self.lockfd = self.ep = -1;
  close(self.wake[0]);
  close(self.wake[1]);
  self.ctl = self.wake[0] = self.wake[1] = -1;
  self.inworker = 0;
  self.score = NULL;
}


void pf_worker_setup (pf_listener **ls, int nls, int ctl, int mode,
                      pf_score *score, pid_t master) {
  struct sigaction sa;
  int channel = mode == PF_CHANNEL;
  int i, n = channel ? 1 : nls;
  self.mode = mode;
  self.inworker = 1;
  self.ls = ls;
  self.nls = nls;
  self.ctl = ctl;
  self.channel = channel;
  self.score = score;
  self.pfd = (struct pollfd *)calloc((size_t)nls + 2, sizeof(struct pollfd));
  if (self.pfd == NULL || pipe2(self.wake, O_CLOEXEC | O_NONBLOCK) != 0)
    pf_exit(111);
  if (channel) {  /* the master accepts: its listeners are none of ours */
    for (i = 0; i < nls; i++) pf_listener_close(ls[i]);
    self.nls = 0;
    self.pfd[0].fd = ctl;
  }
  for (i = 0; i < nls && !channel; i++)
    self.pfd[i].fd = pf_listener_fd(ls[i]);
  for (i = 0; i < n; i++) self.pfd[i].events = POLLIN;
  self.pfd[n].fd = self.wake[0];
  self.pfd[n].events = POLLIN;
  /* a connection wakes one waiting worker, not all: EPOLLEXCLUSIVE (the
  ** lock holder alone waits under "mutex"); the stop pipe wakes us all */
  self.ep = epoll_create1(EPOLL_CLOEXEC);
  for (i = 0; i <= n && self.ep >= 0; i++) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | (i < n && mode != PF_MUTEX ? EPOLLEXCLUSIVE : 0);
    ev.data.fd = self.pfd[i].fd;
    if (epoll_ctl(self.ep, EPOLL_CTL_ADD, self.pfd[i].fd, &ev) != 0) {
      close(self.ep);  /* poll(2) will do */
      self.ep = -1;
    }
  }
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


void pf_worker_closed (void) {
  if (self.score != NULL)
    bump(self.score->inflight, -1);
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


void pf_worker_stoplistening (void) {
  int i;
  if (self.ep >= 0) close(self.ep);  /* it watched them */
  self.ep = -1;
  for (i = 0; i < self.nls; i++)
    pf_listener_close(self.ls[i]);
  self.nls = 0;
}


/* accept(2) failures that concern one connection only (accept(2): on
** Linux pending network errors surface here and mean "try again") */
static int transient (int en) {
  switch (en) {
    case EAGAIN: case EINTR: case ECONNABORTED: case EPROTO:
    case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
    case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
      return 1;
    default:
      return 0;
  }
}


/* a connection the master handed over (accept = "master"): 1 with
** c->fd set, 0 none there, -1 the master is gone */
static int fromchannel (pf_conn *c) {
  int fd, n = pf_recvfd(self.ctl, &fd);
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
  if (n == 0) {  /* the master is gone: stop */
    self.stopping = 1;
    return 0;
  }
  if (fd < 0) return 0;  /* a byte without a connection: nothing to take */
  c->fd = fd;
  fcntl(fd, F_SETFL, O_NONBLOCK);
  return 1;
}


/* accept = "mutex": open the master's lock file again, through the copy
** of its fd this worker inherited, as an open file of its own (flock
** excludes between open files, not between copies of one); the copy goes */
int pf_worker_lock (int inherited) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/self/fd/%d", inherited);
  self.lockfd = open(path, O_RDWR | O_CLOEXEC);
  close(inherited);
  return self.lockfd;
}


/* wait for the lock; TERM and INT interrupt the wait (and only it), so
** that a stopping worker does not queue for the lock. 0 held, -1 not. */
static int lockwait (void) {
  struct sigaction sa, old1, old2;
  int r;
  sa.sa_handler = onstop;
  sa.sa_flags = 0;  /* no SA_RESTART: flock returns EINTR */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old1);
  sigaction(SIGINT, &sa, &old2);
  r = self.stopping ? -1 : flock(self.lockfd, LOCK_EX);
  sigaction(SIGTERM, &old1, NULL);
  sigaction(SIGINT, &old2, NULL);
  return r == 0 ? 0 : -1;
}


static void unlock (void) {
  if (self.locked) flock(self.lockfd, LOCK_UN);
  self.locked = 0;
}


/* one round over the listeners: 1 with c->fd set, 0 none ready, -1 */
int pf_worker_accept (pf_conn *c) {
  int k, st = 0, trylock = self.mode == PF_MUTEX && !self.locked;
  if (trylock) {  /* in serve: take the lock for this round, or pass */
    if (flock(self.lockfd, LOCK_EX | LOCK_NB) != 0) return 0;
    self.locked = 1;
  }
  if (self.channel) {
    st = fromchannel(c);
    if (st > 0) {
      c->counted = 1;
      bump(self.score->accepted, 1);
      bump(self.score->inflight, 1);
    }
    return st;
  }
  for (k = 0; k < self.nls && st == 0; k++) {
    int i = (self.next + k) % self.nls;
    int fd = accept4(pf_listener_fd(self.ls[i]), NULL, NULL,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      self.next = i + 1;
      c->fd = fd;
      c->counted = 1;
      bump(self.score->accepted, 1);
      bump(self.score->inflight, 1);
      st = 1;
    }
    else if (!transient(errno))
      st = -1;
  }
  if (trylock) unlock();
  return st;
}


/*
** worker:accept() -> conn | nil, "stopping" | nil, "accept: err", errno
** Blocks until a connection comes on any listener or a stop begins; at
** the stop the worker's listeners are closed.
*/
static int l_accept (lua_State *L) {
  pf_conn *c;
  if (!self.inworker)
    return luaL_error(L, "accept: not in a worker process");
  pf_worker_ready();
  c = pf_newconn(L);
  while (!self.stopping) {
    char drain[64];
    int st;
    if (self.mode == PF_MUTEX && !self.locked) {  /* the seed's lock */
      if (lockwait() != 0) continue;
      self.locked = 1;
    }
    st = pf_worker_accept(c);
    if (st != 0) unlock();
    if (st > 0) return 1;
    if (st < 0) return pf_fail(L, "accept");
    if (self.ep >= 0) {
      struct epoll_event evs[4];
      if (epoll_wait(self.ep, evs, 4, -1) < 0 && errno != EINTR)
        return pf_fail(L, "epoll_wait");
    }
    else if (poll(self.pfd, (nfds_t)(self.channel ? 1 : self.nls) + 1, -1) < 0
             && errno != EINTR)
      return pf_fail(L, "poll");
    while (read(self.wake[0], drain, sizeof(drain)) > 0) {}
  }
  unlock();
  if (pf_worker_drains() && pf_worker_accept(c) > 0) {
    self.drained++;
    return 1;  /* handed over, or queued on our own socket: served */
  }
  pf_worker_stoplistening();
  luaL_pushfail(L);
  lua_pushliteral(L, "stopping");
  return 2;
}


/* the listeners' fds (n of them) then the stop pipe's read end; NULL
** outside a worker */
const struct pollfd *pf_worker_fds (int *n) {
  *n = self.channel ? 1 : self.nls;
  return self.inworker ? self.pfd : NULL;
}


/* a stopping worker takes what waits for it alone: what the master
** handed over, or the queue of its own socket (a bounded number, for a
** socket that keeps filling) */
int pf_worker_drains (void) {
  return (self.mode == PF_CHANNEL || self.mode == PF_OWN)
         && self.drained < 4096;
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
