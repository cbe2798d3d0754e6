/*
** serve.c: worker:serve(handler), the worker's accept loop on the task
** scheduler (task.c): each connection accepted runs handler(conn) in a
** task of its own, so that conn:read and conn:write yield instead of
** blocking.
**
** Accepting: each listener has a watcher in the loop, and for the shared
** listeners its entry in libev's epoll set is made EPOLLEXCLUSIVE, so
** that a connection wakes one worker, not all (no thundering herd). The
** kernel wakes the first worker in the listener's queue that sleeps, so
** one could take them all; a worker that holds clearly more connections
** than a sibling leaves the queue for a moment (see "Balance").
**
** Stopping: when TERM comes, the worker stops accepting and closes its
** listeners (having taken what waits for it alone); connections that are
** idle (an answer went out, nothing came since) see read return nil,
** "stopping"; the others finish their request. serve returns when no
** task is left (the master sends KILL after graceful_timeout).
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>

#include <ev.h>

#include "prefork.h"


/* connections accepted at most per wake-up, so one busy listener does
** not starve the coroutines already running */
#define ACCEPTBATCH	64

/* seconds an idle connection still gets, at a stop, to send a request
** (one its client sent as the stop began is answered, not lost) */
#define LINGER	1.0


static struct {
  struct ev_loop *loop;
  lua_State *L;  /* the thread that called serve */
  int handler;  /* registry ref */
  int spare;  /* registry ref: a connection object no accept filled; or
              ** LUA_NOREF (the next wake-up uses it: most end so) */
  ev_io *acc;  /* a watcher for each listener */
  int nacc;
  int exclusive;  /* the entries are made exclusive (see makeexclusive) */
  int ep;  /* libev's epoll set, once found; -1 */
  int guess;  /* the fd it most likely has (the lowest free one as the
              ** loop was made); -1 */
  uint64_t *data;  /* the listeners' entries' data there, once found */
  int balanced;  /* the entries are exclusive, their data known */
  int resting;  /* out of the queues (see "Balance") */
  double restsince;  /* since when, ev_now */
  double waitsince;  /* connections have waited since (ev_now), or 0 */
  double norest;  /* no rest before (ev_now): the siblings seemed stuck */
  double lastflip;
  int stopping;
  ev_io wake;  /* the worker's stop pipe */
  ev_timer pause;  /* accepting again after a failure */
  ev_timer rest;  /* back in the queues, */
  ev_check back;  /* or sooner, as the loop turns */
} sv;  /* all zero: not serving */


/* {======================================================
** The loop
** ======================================================= */

static void makeexclusive (void);
static void leaveset (void);
static int balance (void);
static void unrest (void);


/* a task for the connection accepted into c (on top of the stack) */
static void start (void) {
  lua_rawgeti(sv.L, LUA_REGISTRYINDEX, sv.handler);
  lua_insert(sv.L, -2);
  pf_task_spawn(sv.L, 1, 1, 1);  /* no memory: the connection goes */
}


/* watch the listeners, or not */
static void watching (int on) {
  int i;
  for (i = 0; i < sv.nacc; i++) {
    if (on) ev_io_start(sv.loop, &sv.acc[i]);
    else ev_io_stop(sv.loop, &sv.acc[i]);
  }
}


/* an accept failed (EMFILE, say): the listeners rest a moment, out of
** libev's set (a stopped watcher's entry stays there until an event
** comes for it: that event would wake this worker alone, and the
** connection would wait the pause out). libev adds them plain again
** after: the balance waits for makeexclusive. */
static void acceptfailed (int en) {
  unrest();
  leaveset();
  watching(0);
  sv.balanced = 0;
  pf_score_accepting(0);
  ev_timer_set(&sv.pause, PF_ACCEPTPAUSE, 0);
  ev_timer_start(sv.loop, &sv.pause);
  pf_worker_acceptfailed(sv.L, en);
}


static void onpause (struct ev_loop *loop, ev_timer *t, int revents) {
  (void)loop; (void)t; (void)revents;
  if (sv.stopping) return;
  watching(1);
  sv.lastflip = 0;  /* libev adds them plain again: the next idle wake-up
                    ** makes them exclusive */
  pf_score_accepting(PF_ACCEPTING);
}


/* a connection object to accept into, on top of the stack */
static pf_conn *newconn (void) {
  if (sv.spare == LUA_NOREF) return pf_newconn(sv.L);
  lua_rawgeti(sv.L, LUA_REGISTRYINDEX, sv.spare);
  luaL_unref(sv.L, LUA_REGISTRYINDEX, sv.spare);
  sv.spare = LUA_NOREF;
  return (pf_conn *)lua_touserdata(sv.L, -1);
}


static void onaccept (struct ev_loop *loop, ev_io *io, int revents) {
  int n;
  (void)io; (void)revents;
  for (n = 0; n < ACCEPTBATCH && !sv.stopping; n++) {
    pf_conn *c;
    int st;
    if (n > 0 && balance())
      return;  /* one at least per wake-up: the one it was woken for */
    c = newconn();
    st = pf_worker_accept(c);
    if (st <= 0) {
      sv.spare = luaL_ref(sv.L, LUA_REGISTRYINDEX);  /* for the next one */
      if (st < 0) acceptfailed(errno);
      else if (n == 0 && sv.exclusive && ev_now(loop) - sv.lastflip >= 1)
        makeexclusive();  /* woken for nothing: are the entries still exclusive? */
      else if (n > 0)
        balance();  /* to the queues' ends, maybe: a sibling takes the next */
      return;
    }
    if (n == 0) pf_worker_acceptworked(sv.L);
    start();
  }
}


static void stopaccepting (void);

/* the stop began: take what waits for this worker alone, stop
** accepting, and end the idle connections' waits */
static void stopserving (void) {
  if (pf_accept_drains()) {
    int k = 0;
    while (k++ < 4096) {
      pf_conn *c = pf_newconn(sv.L);
      if (pf_worker_accept(c) <= 0) {
        lua_pop(sv.L, 1);
        break;
      }
      start();
    }
  }
  sv.stopping = 1;
  stopaccepting();
  ev_timer_stop(sv.loop, &sv.pause);
  ev_io_stop(sv.loop, &sv.wake);
  pf_worker_stoplistening();
  pf_task_stop(LINGER);
}


static void onwake (struct ev_loop *loop, ev_io *io, int revents) {
  (void)loop; (void)io; (void)revents;
  if (pf_worker_stopping()) stopserving();
}


/* {------------------------------------------------------
** Exclusive wake-ups. Each listener has a watcher of its own in the loop;
** for the shared sockets (strategies "shared" and "mutex"), its entry in
** libev's epoll set is then made EPOLLEXCLUSIVE, so that a connection
** wakes one idle worker. (In a set of their own, watched by the loop's,
** EPOLLEXCLUSIVE wakes every worker: the kernel counts an exclusive
** wake-up only for a task that sleeps on that very set.) libev has no
** flag for it: makeexclusive() finds libev's set, the one epoll set here whose
** entries for the wake pipe and every listener carry libev's data (the
** fd, and a generation above it), read from /proc/self/fdinfo, and adds
** each listener again, exclusive, with the same data. libev leaves such
** an entry alone while its watcher stays started, but rebuilds its whole
** set after some errors (plain entries again): a wake-up that finds no
** connection flips again, at most once a second. Where a step fails the
** entries stay as libev made them: a herd, but correct.
** ------------------------------------------------------- */

#define EXCLUSIVEBIT	0x10000000u  /* EPOLLEXCLUSIVE, as fdinfo shows it */

/* fd into epoll set ep with libev's data: exclusive, or plain (as libev
** adds it: a herd, but correct) when the kernel refuses that. 1 when
** exclusive (or there already), 0 plain, -1 neither */
static int addentry (int ep, int fd, uint64_t data) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  ev.data.u64 = data;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0 || errno == EEXIST) return 1;
  ev.events = EPOLLIN;
  return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0 ? 0 : -1;
}

/* fd's entry in the set of fdinfo file f: 1 with *data, *events */
static int findentry (FILE *f, int fd, uint64_t *data, unsigned *events) {
  char line[256];
  rewind(f);
  while (fgets(line, sizeof(line), f) != NULL) {
    int tfd;
    unsigned ev;
    unsigned long long d;
    if (sscanf(line, "tfd: %d events: %x data: %llx", &tfd, &ev, &d) == 3
        && tfd == fd && (uint32_t)d == (uint32_t)fd && (d >> 32) != 0) {
      *data = (uint64_t)d;
      *events = ev;
      return 1;
    }
  }
  return 0;
}


/* ep is libev's set (its entries for the wake pipe and every listener
** carry libev's data): 1, with sv.ep and sv.data set and the listeners'
** entries there made exclusive */
static int tryset (int ep) {
  char path[64];
  FILE *f;
  int i, all, exclusive = 1;
  uint64_t data;
  unsigned events;
  snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", ep);
  if ((f = fopen(path, "re")) == NULL) return 0;
  all = findentry(f, sv.wake.fd, &data, &events);
  for (i = 0; all && i < sv.nacc; i++)
    all = findentry(f, sv.acc[i].fd, &data, &events);
  for (i = 0; all && i < sv.nacc; i++) {
    findentry(f, sv.acc[i].fd, &data, &events);
    sv.data[i] = data;
    if (!(events & EXCLUSIVEBIT)
        && epoll_ctl(ep, EPOLL_CTL_DEL, sv.acc[i].fd, NULL) == 0
        && addentry(ep, sv.acc[i].fd, data) != 1)
      exclusive = 0;  /* a herd: no balance either */
  }
  fclose(f);
  if (!all) return 0;
  sv.ep = ep;
  sv.balanced = exclusive;
  pf_score_accepting(PF_ACCEPTING);
  return 1;
}


/* find libev's set (sv.ep, sv.data) and make the entries there
** exclusive. It is looked for first where it was, or most likely is
** (sv.guess), then among every fd: a new worker's first listing of
** /proc/self/fdinfo costs it 0.3 to 0.5 ms here, a tenth of a respawn. */
static void makeexclusive (void) {
  DIR *d;
  struct dirent *e;
  int hint = sv.ep >= 0 ? sv.ep : sv.guess;
  sv.lastflip = ev_now(sv.loop);
  if ((hint >= 0 && tryset(hint))
      || (d = opendir("/proc/self/fdinfo")) == NULL)
    return;
  while ((e = readdir(d)) != NULL) {
    int ep = atoi(e->d_name);
    if (e->d_name[0] != '.' && ep != dirfd(d) && tryset(ep)) break;
  }
  closedir(d);
}


/* a connection before the set is found waits (epoll tells of it again) */
static void onfirst (struct ev_loop *loop, ev_io *io, int revents) {
  (void)loop; (void)io; (void)revents;
}


/* a watcher for each listener (fds[0..n-1]; fds[n] is the wake pipe),
** exclusive where that helps; 0 without memory */
static int watchlisteners (const struct pollfd *fds, int n) {
  int i;
  sv.acc = (ev_io *)calloc((size_t)n, sizeof(ev_io));
  sv.data = (uint64_t *)calloc((size_t)n, sizeof(uint64_t));
  if (sv.acc == NULL || sv.data == NULL) return 0;
  for (i = 0; i < n; i++) {
    ev_io_init(&sv.acc[i], onfirst, fds[i].fd, EV_READ);
    ev_io_start(sv.loop, &sv.acc[i]);
  }
  sv.nacc = n;
  sv.exclusive = !pf_accept_drains()  /* (not a socket of its own) */
                 && ev_backend(sv.loop) == EVBACKEND_EPOLL;
  if (sv.exclusive) {
    ev_run(sv.loop, EVRUN_NOWAIT);  /* libev adds the entries; no accept
                                    ** yet (one that failed would pause
                                    ** before the set is known, and with
                                    ** no fd left, it could not be found) */
    if (!sv.stopping) makeexclusive();
  }
  for (i = 0; i < n; i++)
    ev_set_cb(&sv.acc[i], onaccept);
  return 1;
}


/* the listeners' entries out of libev's set, behind its back (ENOENT
** when they were out already) */
static void leaveset (void) {
  int i;
  for (i = 0; sv.ep >= 0 && i < sv.nacc; i++)
    (void)epoll_ctl(sv.ep, EPOLL_CTL_DEL, sv.acc[i].fd, NULL);
}


/* stop watching the listeners (before they are closed: libev's lazy
** removal would leave the entries of sockets that stay open elsewhere) */
static void stopaccepting (void) {
  unrest();
  pf_score_accepting(0);
  sv.balanced = 0;
  leaveset();
  watching(0);
  sv.nacc = 0;
}

/* }------------------------------------------------------ */


/* {------------------------------------------------------
** Balance. The kernel wakes the first worker that sleeps in a listener's
** queue of exclusive waiters, so under a light load one worker may take
** every connection, and keep-alive connections stay where they landed
** (nginx's workers do the same). A worker that finds itself ahead after
** taking one connection at least (pf_score_ahead: clearly more
** connections than a live sibling) leaves the queues when another takes
** the next ones (pf_score_leave): it removes its exclusive entries from
** libev's set, behind libev's back (the watchers stay started), so the
** next connections wake a sibling. When it is no longer ahead (it looks
** as its loop turns, and every REST; RESTMAX at most), it adds them
** again, with libev's data, at the queues' ends. Connections that came
** meanwhile reached a sibling too (the kernel goes on down the queue past
** a worker that does not sleep: an awake one finds them as its loop
** turns). Every REST it also looks at the listeners: a connection
** that waits while no sibling that accepts sleeps (they are all in their
** handlers) brings it back at once. A sibling that sleeps can still fail
** it (stopped while idle, dead and not reaped yet, an older kernel's
** wake-ups): when connections are seen waiting at every look for STUCK,
** the worker comes back and rests no more for NOREST. (Should libev make
** a new set, with new data, the entries it re-adds are plain until the
** next idle wake-up's makeexclusive, at most once a second.)
** ------------------------------------------------------- */

#define REST	0.001  /* seconds between a resting worker's looks */
#define RESTMAX	0.05  /* seconds it rests at most in a row */
#define STUCK	0.01  /* seconds connections may wait on a resting worker */
#define NOREST	1.0  /* seconds it then takes every connection it sees */


/* listener i back in libev's set, exclusive, with libev's data; 0 when
** the kernel refused (plain then, or libev adds it, or stops its
** watcher) */
static int readd (int i) {
  int st = addentry(sv.ep, sv.acc[i].fd, sv.data[i]);
  if (st < 0) {
    ev_io_stop(sv.loop, &sv.acc[i]);  /* libev tells the kernel again */
    ev_io_set(&sv.acc[i], sv.acc[i].fd, EV_READ);
    ev_io_start(sv.loop, &sv.acc[i]);
  }
  return st == 1;
}


/* back in the queues, at their ends */
static void rejoin (void) {
  int i;
  unrest();
  for (i = 0; i < sv.nacc; i++)
    if (!readd(i)) sv.balanced = 0;  /* plain: a herd, but correct */
  pf_score_accepting(PF_ACCEPTING);
}


/* no longer resting (its entries stay as they are) */
static void unrest (void) {
  sv.resting = 0;
  ev_timer_stop(sv.loop, &sv.rest);
  ev_check_stop(sv.loop, &sv.back);
}


/* after a connection taken: leave the queues if ahead; 1 when it did */
static int balance (void) {
  int i;
  if (!sv.balanced || sv.resting || ev_now(sv.loop) < sv.norest
      || !pf_score_ahead() || !pf_score_leave())
    return 0;
  for (i = 0; i < sv.nacc; i++) {
    if (epoll_ctl(sv.ep, EPOLL_CTL_DEL, sv.acc[i].fd, NULL) != 0) {
      while (i-- > 0) readd(i);  /* not libev's set any more (it made a */
      sv.balanced = 0;           /* new one): the next idle wake-up finds it */
      pf_score_accepting(PF_ACCEPTING);
      return 0;
    }
  }
  sv.resting = 1;
  sv.restsince = ev_now(sv.loop);
  sv.waitsince = 0;
  ev_timer_set(&sv.rest, REST, 0);
  ev_timer_start(sv.loop, &sv.rest);
  ev_check_start(sv.loop, &sv.back);
  return 1;
}


/* a connection waits on a listener */
static int waiting (void) {
  int i;
  for (i = 0; i < sv.nacc; i++) {
    struct pollfd p;
    p.fd = sv.acc[i].fd;
    p.events = POLLIN;
    p.revents = 0;
    if (poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) return 1;
  }
  return 0;
}


static void onrest (struct ev_loop *loop, ev_timer *t, int revents) {
  double now = ev_now(loop);
  (void)revents;
  if (!sv.resting || sv.stopping) return;
  if (!waiting()) sv.waitsince = 0;
  else if (!pf_score_idle()) {  /* the siblings are busy: take it now */
    rejoin();
    return;
  }
  else if (sv.waitsince == 0) sv.waitsince = now;
  else if (now - sv.waitsince >= STUCK) {
    sv.norest = now + NOREST;  /* no sibling takes them */
    rejoin();
    return;
  }
  if (now - sv.restsince < RESTMAX && pf_score_stayout()) {
    ev_timer_set(t, REST, 0);  /* the siblings have not caught up */
    ev_timer_start(loop, t);
  }
  else rejoin();
}


/* the loop turned: the siblings may have caught up */
static void onback (struct ev_loop *loop, ev_check *c, int revents) {
  (void)loop; (void)c; (void)revents;
  if (sv.resting && !sv.stopping && !pf_score_stayout()) rejoin();
}

/* }------------------------------------------------------ */


/* after serve: the watchers, the loop, the handler go */
static void endserve (void) {
  free(sv.acc);
  sv.acc = NULL;
  free(sv.data);
  sv.data = NULL;
  sv.nacc = 0;
  sv.ep = -1;
  pf_task_close();
  sv.loop = NULL;
  if (sv.handler != LUA_NOREF) luaL_unref(sv.L, LUA_REGISTRYINDEX, sv.handler);
  luaL_unref(sv.L, LUA_REGISTRYINDEX, sv.spare);
  sv.handler = sv.spare = LUA_NOREF;
}


/*
** worker:serve(handler): run handler(conn) in a task for each
** connection, until a graceful stop has seen every one end. Returns true.
*/
static int l_serve (lua_State *L) {
  int n;
  const struct pollfd *fds = pf_worker_fds(&n);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (fds == NULL)
    return luaL_error(L, "serve: not in a worker process");
  sv.guess = fcntl(fds[n].fd, F_DUPFD_CLOEXEC, 0);
  if (sv.guess >= 0) close(sv.guess);
  if ((sv.loop = pf_task_open(L)) == NULL)
    return luaL_error(L, "serve: %s", lua_tostring(L, -1));
  sv.ep = -1;
  sv.nacc = 0;
  lua_pushvalue(L, 2);
  sv.handler = luaL_ref(L, LUA_REGISTRYINDEX);
  sv.spare = LUA_NOREF;
  sv.L = L;
  sv.stopping = 0;
  ev_io_init(&sv.wake, onwake, fds[n].fd, EV_READ);
  ev_io_start(sv.loop, &sv.wake);
  ev_init(&sv.pause, onpause);
  ev_init(&sv.rest, onrest);
  ev_check_init(&sv.back, onback);
  sv.balanced = sv.resting = 0;
  sv.norest = 0;
  pf_worker_ready();
  pf_worker_dropwaitset();
  if (pf_worker_stopping()) stopserving();
  else if (!watchlisteners(fds, n)) {
    endserve();
    return luaL_error(L, "not enough memory");
  }
  pf_task_run();
  endserve();
  lua_pushboolean(L, 1);
  return 1;
}


/* in a new child (a pool's template): the copy of a running serve loop
** goes, with its fds */
void pf_serve_forget (void) {
  if (sv.loop == NULL) return;
  pf_task_forget();
  free(sv.acc);
  free(sv.data);
  memset(&sv, 0, sizeof(sv));
  sv.ep = -1;
}


void pf_open_serve (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"serve", l_serve},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
