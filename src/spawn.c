/*
** spawn.c: forking a worker: before_fork, the fork with its readiness
** pipe and scoreboard slot, and the new worker's side (its listeners,
** the worker setup, the title, then the body); a failed fork is retried
** with backoff.
**
** A standby (opts.standby) is a worker forked ahead: forked, reset, set
** up as far as that does not depend on the worker it becomes, its pages
** written (copy-on-write done), it says "s" on its socket and waits. A
** spawn then sends a ready one the address of that worker, which is
** valid in its copy of the table (table.c KILLs the standbys at any
** change of the set), and it goes on as a new worker does. The fork is
** off the respawn's path.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include "state.h"


/* what a new worker needs to know, for childmain */
typedef struct childargs {
  master *m;
  worker *w;
  int ctl, slot, tfd;
  int ahead;  /* a standby that became a worker, but for w and its name */
} childargs;


/* the listeners of the new worker a, as an array (kept alive in the
** registry) */
static pf_listener **childlisteners (lua_State *L, childargs *a, int *n) {
  pf_listener **ls;
  int i;
  if (a->m->strategy == PF_ACCEPT_REUSEPORT)  /* its own; the others' are not */
    pf_ports_only(L, a->w->ports);
  else
    pf_pushlisteners(L, a->m);
  *n = (int)luaL_len(L, -1);
  ls = (pf_listener **)lua_newuserdatauv(L, sizeof(pf_listener *)
                                            * ((size_t)*n + 1), 0);
  lua_setfield(L, LUA_REGISTRYINDEX, "prefork.worker.listeners");
  for (i = 0; i < *n; i++) {
    lua_rawgeti(L, -1, i + 1);
    ls[i] = pf_checklistener(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return ls;
}


/* the worker side, set up over the listeners; name is for the log */
static void setup (lua_State *L, childargs *a, const char *name) {
  master *m = a->m;
  pf_workerspec spec;
  spec.L = L;
  spec.ls = childlisteners(L, a, &spec.nls);
  spec.ctl = a->ctl;
  spec.mode = m->strategy;
  spec.board = m->board;
  spec.score = &m->score[a->slot];
  spec.watchdog = a->tfd;
  spec.timeout = m->timeout;
  spec.master = m->pid;
  spec.name = name;
  pf_worker_setup(&spec);
}


/* what makes a process a worker, but for its context: the worker side,
** the mutex's lock file, the user */
static void becomeworker (lua_State *L, childargs *a, const char *name) {
  master *m = a->m;
  setup(L, a, name);
  if (m->strategy == PF_ACCEPT_MUTEX && pf_accept_openlock(m->lockfd) < 0)
    luaL_error(L, "mutex: lock file: %s", strerror(errno));
  if (m->user[0] != '\0') {
    const char *what;
    if (pf_becomeuser(m->user, m->uid, m->gid, &what) != 0)
      luaL_error(L, "user %s: %s: %s", m->user, what, strerror(errno));
  }
}


/* the process title: opts.title, what and name */
static void settitle (lua_State *L, master *m, const char *what,
                      const char *name) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, m->opts);
  if (lua_getfield(L, -1, "title") == LUA_TSTRING) {
    char title[256];
    snprintf(title, sizeof(title), "%s %s%s", lua_tostring(L, -1), what,
             name);
    pf_settitle(title);
  }
  lua_pop(L, 2);
}


/* the body of a new worker, run protected: the worker side (unless a
** standby did it ahead), the title, then opts.child(context) */
static int childmain (lua_State *L) {
  childargs *a = (childargs *)lua_touserdata(L, 1);
  master *m = a->m;
  m->L = L;
  if (a->ahead) pf_worker_rename(a->w->name);
  else becomeworker(L, a, a->w->name);
  settitle(L, m, "worker ", a->w->name);
  if (!pf_pushcb(L, m, "child"))
    return luaL_error(L, "no worker body");
  pf_pushctx(L, m, a->w);
  lua_call(L, 1, 0);
  return 0;
}


/* a standby's wait for the address of the worker it becomes, with the
** signals of mask unblocked only inside ppoll (so that none is missed
** between the check and the wait); it leaves at the master's end, or when
** told to stop (TERM, INT: the handlers set up ahead only note it) */
static worker *waitworker (int fd, const sigset_t *mask) {
  char buf[sizeof(worker *)];
  size_t got = 0;
  worker *w;
  while (got < sizeof(buf)) {
    struct pollfd p;
    ssize_t n;
    p.fd = fd;
    p.events = POLLIN;
    if (pf_worker_stopping()) pf_exit(0);
    if (ppoll(&p, 1, NULL, mask) < 0) {
      if (errno != EINTR) pf_exit(0);
      continue;
    }
    n = read(fd, buf + got, sizeof(buf) - got);
    if (n > 0) got += (size_t)n;
    else if (n == 0 || errno != EINTR) pf_exit(0);
  }
  memcpy(&w, buf, sizeof(buf));
  return w;
}


/* the body of a standby: it becomes a worker as far as it can ahead
** (not its listeners under reuseport: they are its id's), takes its
** copy-on-write faults, says it is ready, and waits for the worker it
** becomes, which is in its copy of the table; then it is that worker */
static int standbymain (lua_State *L) {
  childargs *a = (childargs *)lua_touserdata(L, 1);
  sigset_t all, old;
  worker *w;
  a->m->L = L;
  settitle(L, a->m, "standby", "");
  a->ahead = a->m->strategy != PF_ACCEPT_REUSEPORT;
  if (a->ahead) becomeworker(L, a, "standby");
  sigfillset(&all);  /* no handler runs while pages are written */
  sigdelset(&all, SIGSEGV);
  sigdelset(&all, SIGBUS);
  sigprocmask(SIG_BLOCK, &all, &old);
  pf_prefault();
  if (write(a->ctl, "s", 1) != 1) pf_exit(0);
  a->w = waitworker(a->ctl, &old);
  sigprocmask(SIG_SETMASK, &old, NULL);
  for (w = a->m->list; w != NULL && w != a->w; w = w->next) {}
  if (w == NULL) return luaL_error(L, "standby: told to be no worker");
  return childmain(L);
}


/* the new worker: a process group of its own (what it starts goes with
** it when it is KILLed), its body, then exit; it never returns */
static void child (lua_State *L, childargs *a, lua_CFunction body) {
  setpgid(0, 0);
  lua_pushcfunction(L, body);
  lua_pushlightuserdata(L, a);
  pf_child_run(L, 1);
}


/* the spawn failed: retry with backoff. The log sink is Lua, which may
** retire w: it is held meanwhile, and freed after if it was. */
static void forkfailed (lua_State *L, master *m, worker *w,
                        const char *what) {
  int en = errno;
  w->fails++;
  pf_schedule(m, w, pf_backoff(w->fails));
  w->hold = 1;
  pf_log(L, "error", "worker %s: %s failed: %s; retry in %.3gs",
         w->name, what, strerror(en), pf_backoff(w->fails));
  w->hold = 0;
  if (!w->respawn || m->stopping) pf_freeworker(L, m, w);
}


/* before_fork(context): 0 when the hook stopped w (it is freed) */
static int beforefork (lua_State *L, master *m, worker *w) {
  w->hold = 1;
  if (pf_pushcb(L, m, "before_fork")) {
    pf_pushctx(L, m, w);
    pf_callhook(L, "before_fork", 1);
  }
  w->hold = 0;
  if (!w->respawn || m->stopping) {
    pf_freeworker(L, m, w);
    return 0;
  }
  return 1;
}


/* the master's side of a new worker: its pid, group, slot, socket and
** watchdog */
static void started (master *m, worker *w, pid_t pid, childargs *a) {
  w->pid = pid;
  w->slot = a->slot;
  w->state = W_STARTING;
  w->started = pf_now();
  w->survived = 0;
  w->ctl = a->ctl;
  w->tfd = a->tfd;
  ev_io_set(&w->ready, w->ctl, EV_READ);
  ev_io_start(EV_DEFAULT, &w->ready);
  pf_arm(w, SURVIVED);
  pf_watch_start(m, w);
}


/* what w's fork needs: a scoreboard slot (with w's max_requests), a
** socket to the master, a watchdog; 0 with the failing step in *what */
static int prepare (master *m, childargs *a, int fds[2], const char **what) {
  pf_score *s;
  *what = "scoreboard";
  if ((a->slot = pf_newslot(m)) < 0) {
    errno = EAGAIN;
    return 0;
  }
  s = &m->score[a->slot];
  pf_score_init(s);
  s->limit = m->maxrequests == 0 ? 0 : m->maxrequests
             + (m->jitter > 0 ? (unsigned long)random() % (m->jitter + 1) : 0);
  *what = "watchdog";
  if (!pf_watch_prepare(&a->tfd)) {
    pf_freeslot(m, a->slot);
    return 0;
  }
  *what = "socketpair";
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    pf_freeslot(m, a->slot);
    close(a->tfd);
    return 0;
  }
  /* never block on it: a process the worker forked may hold the other
  ** end after the worker is gone */
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  return 1;
}


/* fork a child that runs body, with what prepare made; the child never
** returns; -1 when the fork failed (what prepare made is let go) */
static pid_t forkwith (lua_State *L, master *m, childargs *a, int fds[2],
                       lua_CFunction body) {
  pid_t pid = pf_fork();
  if (pid == 0) {
    close(fds[0]);
    a->ctl = fds[1];
    child(L, a, body);
  }
  close(fds[1]);
  if (pid < 0) {
    close(fds[0]);
    close(a->tfd);
    pf_freeslot(m, a->slot);
    return -1;
  }
  setpgid(pid, pid);  /* as the child does: whichever comes first */
  a->ctl = fds[0];
  return pid;
}


/* the first ready standby, or NULL */
static standby **readystandby (master *m) {
  standby **p;
  for (p = &m->spare; *p != NULL && !(*p)->ready; p = &(*p)->next) {}
  return *p != NULL ? p : NULL;
}


/* w becomes the first ready standby that hears it: 0 when none is left
** (a dead or dying one is reaped) */
static int fromstandby (master *m, worker *w) {
  standby **p, *s;
  childargs a;
  while ((p = readystandby(m)) != NULL
         && send((*p)->ctl, &w, sizeof(w), MSG_NOSIGNAL) != (ssize_t)sizeof(w))
    pf_standby_kill(m, p);
  if (p == NULL) return 0;
  s = *p;
  *p = s->next;
  ev_io_stop(EV_DEFAULT, &s->said);
  ev_timer_stop(EV_DEFAULT, &s->late);
  a.slot = s->slot;
  a.ctl = s->ctl;
  a.tfd = s->tfd;
  started(m, w, s->pid, &a);
  free(s);
  return 1;
}


void pf_spawn (lua_State *L, master *m, worker *w) {
  int fds[2];
  const char *what;
  childargs a;
  pid_t pid;
  a.m = m;
  a.w = w;
  a.ahead = 0;
  if (!beforefork(L, m, w)) return;
  if (fromstandby(m, w)) {
    pf_log(L, "info", "worker %s (pid %ld) started (the standby)", w->name,
           (long)w->pid);
    return;
  }
  if (!prepare(m, &a, fds, &what)) {
    forkfailed(L, m, w, what);
    return;
  }
  if ((pid = forkwith(L, m, &a, fds, childmain)) < 0) {
    forkfailed(L, m, w, "fork");
    return;
  }
  started(m, w, pid, &a);
  pf_log(L, "info", "worker %s (pid %ld) started", w->name, (long)pid);
}


/* what s said: 1 ready (logged last: the log hook may change the set
** and free s), 0 its socket ended (its exit is reaped), -1 nothing yet */
static int hear (standby *s) {
  char c = 0;
  ssize_t n = recv(s->ctl, &c, 1, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
  ev_io_stop(EV_DEFAULT, &s->said);
  ev_timer_stop(EV_DEFAULT, &s->late);
  if (n != 1 || c != 's') return 0;
  s->ready = 1;
  s->m->sbfails = 0;
  pf_log(s->m->L, "info", "standby (pid %ld) ready to take a place",
         (long)s->pid);
  return 1;
}


/* a standby said it is ready (or its socket ended: its exit is reaped) */
static void onsaid (struct ev_loop *loop, ev_io *io, int revents) {
  (void)loop; (void)revents;
  (void)hear((standby *)io->data);
}


/* a standby not ready by boot_timeout (stopped, stuck): KILLed, and
** replaced once it is reaped, as one that died. (Its "ready" may have
** come in the same loop turn, behind a busy hook: heard first.) */
static void onlate (struct ev_loop *loop, ev_timer *t, int revents) {
  standby *s = (standby *)t->data;
  master *m = s->m;
  pid_t pid = s->pid;
  (void)loop; (void)revents;
  if (hear(s) == 1) return;
  ev_io_stop(EV_DEFAULT, &s->said);  /* it is not taken now */
  kill(pid, SIGKILL);
  pf_log(m->L, "warn", "standby (pid %ld) not ready after %.3gs "
         "(boot_timeout): KILL", (long)pid, m->boottimeout);
}


/* fork a standby: 1, or 0 when a step failed (logged) */
int pf_spawn_standby (lua_State *L, master *m) {
  int fds[2];
  const char *what = "malloc";
  childargs a;
  standby *s = (standby *)malloc(sizeof(standby));
  a.m = m;
  a.w = NULL;
  if (s != NULL && prepare(m, &a, fds, &what)) {
    what = "fork";
    if ((s->pid = forkwith(L, m, &a, fds, standbymain)) > 0) {
      s->m = m;
      s->slot = a.slot;
      s->ctl = a.ctl;
      s->tfd = a.tfd;
      s->ready = 0;
      ev_io_init(&s->said, onsaid, s->ctl, EV_READ);
      ev_timer_init(&s->late, onlate, m->boottimeout, 0);
      s->said.data = s->late.data = s;
      ev_io_start(EV_DEFAULT, &s->said);
      if (m->boottimeout > 0) ev_timer_start(EV_DEFAULT, &s->late);
      s->next = m->spare;
      m->spare = s;
      pf_log(L, "info", "standby (pid %ld) forked", (long)s->pid);
      return 1;
    }
  }
  pf_log(L, "error", "standby: %s failed: %s", what, strerror(errno));
  free(s);
  return 0;
}

/* }====================================================== */
