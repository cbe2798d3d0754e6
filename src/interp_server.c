/*
** interp_server.c: the server side of chiark-utils' prefork-interp
** protocol (wire-compatible with Debian's /usr/bin/prefork-interp 7.0.0).
**
** Process model: one executor per call. The server (the initialised
** script, setsid'd) runs the module's libev loop; it accepts, checks the
** peer's uid, sends the greeting and reads the request itself, without
** blocking. A complete request goes to a spare executor made ahead, or,
** when none is ready, to a child forked there and then; the executor
** gets a process group of its own, the caller's fds 0/1/2, environment
** and argv, and returns into the script (interp_exec.c). The server then
** plays upstream's "monitor" for that call: bytes the client sends are
** signals for the executor's group, EOF means the client is gone (SIGINT
** to the group), and the executor's status goes back as a big-endian
** u32: sent by the executor itself as it ends (its early status, which it
** reports first), else by the server, early or reaped by libev. The first
** call comes on the CALL socketpair.
**
** A call holds one of max_servers slots only once its request is
** complete. Before, it has PF_INTERP_REQTIMEOUT seconds from the
** greeting to send it, and at most PF_INTERP_MAXPENDING connections are
** read from at once: idle connections cannot starve the callers behind.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <ev.h>

#include "interp_state.h"


/* {======================================================
** Server state
** ======================================================= */

typedef struct call {
  pf_icall c;
  struct call *next;  /* S.calls */
  struct call *qnext;  /* S.queue: complete, not started yet */
  ev_io io;  /* the connection */
  ev_timer timer;  /* the request's deadline */
  ev_child child;  /* the executor */
  pid_t peer;  /* the client's pid */
  int init;  /* the first call (CALL socketpair) */
  int held;  /* it holds a slot */
} call;


static struct {
  pf_iopts o;
  const char *argv0;  /* this program's argv[0], before the titles */
  uid_t uid;
  pid_t self;
  long errors;
  int ncalls;  /* every call: pending + waiting + held */
  int npending;  /* reading their request */
  int nwaiting;  /* complete, waiting for a slot */
  int nheld;  /* holding a slot */
  int draining;  /* stop accepting; exit with exitcode once ncalls == 0 */
  int exitcode;
  int wantfork;  /* a call with a slot needs a fork (outside ev_run) */
  call *calls;
  call *queue;  /* complete calls not started, first come first */
  ev_io lw, ww;  /* the listener, the watcher's pipe */
  ev_timer idle;
  int sigfd;  /* signalfd of PF_SIGREPORT: early statuses */
  ev_io sw;
  ev_idle kick;  /* fed when a spare is ready (interp_spare.c) */
} S;


/* the call is the first one: its errors go to the first caller too */
#define FIRST(c)	((c) != NULL && (c)->init)


static void drain (int code);


/* an error counted against max_errors */
static void counterror (void) {
  if (S.o.max_errors >= 0 && ++S.errors > S.o.max_errors && !S.draining) {
    pf_ilog(0, LOG_ERR, "too many errors (%ld), quitting", S.errors);
    drain(127);
  }
}

/* }====================================================== */


/* {======================================================
** Calls
** ======================================================= */

static void startlistening (void);
static void startqueue (void);
static int takespare (call *c);


/* c out of S.calls, or of S.queue */
static void unlist (call **list, call *c, int q) {
  call **p;
  for (p = list; *p != NULL; p = q ? &(*p)->qnext : &(*p)->next)
    if (*p == c) { *p = q ? c->qnext : c->next; break; }
}


/* the counts without c */
static void uncount (call *c) {
  if (c->held) S.nheld--;
  else if (c->c.state == PF_CREADY) S.nwaiting--;
  else S.npending--;
  if (c->c.state == PF_CREADY) unlist(&S.queue, c, 1);
  S.ncalls--;
}


static void freecall (call *c) {
  unlist(&S.calls, c, 0);
  uncount(c);
  ev_io_stop(EV_DEFAULT, &c->io);
  ev_timer_stop(EV_DEFAULT, &c->timer);
  ev_child_stop(EV_DEFAULT, &c->child);
  pf_icall_close(&c->c);
  if (c->init) pf_ilog_closefirst();
  free(c);
  if (S.ncalls == 0) {
    if (S.draining) ev_break(EV_DEFAULT, EVBREAK_ALL);
    else if (S.o.idle_timeout >= 0) {
      ev_timer_set(&S.idle, S.o.idle_timeout, 0);
      ev_timer_start(EV_DEFAULT, &S.idle);
    }
  }
  startqueue();
  startlistening();
}


/* a bad call: say why, close it, no executor */
static void callerror (call *c, const char *what, int en) {
  if (en != 0)
    pf_ilog(FIRST(c), LOG_ERR, "call: %s: %s", what, strerror(en));
  else
    pf_ilog(FIRST(c), LOG_ERR, "call: %s", what);
  freecall(c);
  counterror();
}


static void takereports (void);

/* bytes after the request: signals; EOF: the client is gone, and the
** call is interrupted, unless its executor answered it: the reports that
** came are taken first (an executor reports before it answers, so its
** client's end never comes before its report) */
static void signalscb (struct ev_loop *loop, ev_io *w, int revents) {
  call *c = (call *)w->data;
  int ignored;
  (void)loop; (void)revents;
  if (!pf_icall_signals(&c->c, &ignored)) {
    ev_io_stop(EV_DEFAULT, &c->io);
    takereports();
    pf_icall_interrupt(&c->c);
  }
  if (ignored >= 0)
    pf_ilog(FIRST(c), LOG_WARNING, "call: ignored signal byte %d", ignored);
}


/* the server's side of an executor that has its call */
static void started (call *c, pid_t pid) {
  c->c.pid = pid;
  c->c.state = PF_CRUN;
  unlist(&S.queue, c, 1);
  ev_child_set(&c->child, pid, 0);
  ev_child_start(EV_DEFAULT, &c->child);
  ev_set_cb(&c->io, signalscb);
  ev_io_start(EV_DEFAULT, &c->io);  /* signals and EOF from now on */
  signalscb(EV_DEFAULT, &c->io, EV_READ);  /* bytes that came with it */
}


/*
** The queue of complete calls: slots to the first ones while there are
** free slots, then each call with a slot to a ready spare. A call that
** finds none is forked outside ev_run (wantfork), and one more spare is
** kept from then on: calls come back to back.
*/
static void startqueue (void) {
  call *c, *next;
  for (c = S.queue; c != NULL; c = next) {
    next = c->qnext;
    if (!c->held && (S.o.max_servers < 0 || S.nheld < S.o.max_servers)) {
      c->held = 1;
      S.nheld++;
      S.nwaiting--;
    }
    if (c->held && !takespare(c) && !S.wantfork) {
      S.wantfork = 1;
      ev_break(EV_DEFAULT, EVBREAK_ALL);
      if (!c->init) pf_ispare_more();
    }
  }
}


/* the request is complete: the call joins the queue */
static void complete (call *c) {
  call **p;
  ev_timer_stop(EV_DEFAULT, &c->timer);
  ev_io_stop(EV_DEFAULT, &c->io);  /* again once started */
  S.npending--;
  S.nwaiting++;
  for (p = &S.queue; *p != NULL; p = &(*p)->qnext) ;
  c->qnext = NULL;
  *p = c;
  startqueue();
  startlistening();
}


/* the next steps of the request: 1 when it goes on, 0 when it is done
** (complete, refused, or the client gone) */
static int readrequest (call *c) {
  const char *why = NULL;
  int en = 0;
  switch (pf_icall_read(&c->c, &why, &en)) {
    case PF_CALL_DONE: complete(c); return 0;
    case PF_CALL_BAD: callerror(c, why, en); return 0;
    case PF_CALL_LEFT:  /* the client gave up before asking: no error */
      pf_ilog(FIRST(c), LOG_INFO, "call: client went away before its request");
      freecall(c);
      return 0;
    default: return 1;
  }
}


/* the connection is readable */
static void requestcb (struct ev_loop *loop, ev_io *w, int revents) {
  (void)loop; (void)revents;
  readrequest((call *)w->data);
}


/* the deadline: what has come is read first */
static void timeoutcb (struct ev_loop *loop, ev_timer *w, int revents) {
  call *c = (call *)w->data;
  (void)loop; (void)revents;
  if (!readrequest(c)) return;
  pf_ilog(FIRST(c), LOG_WARNING, "call: no complete request within %g s "
          "(client pid %ld): closed", PF_INTERP_REQTIMEOUT, (long)c->peer);
  freecall(c);
  counterror();
}


/* the status of a call to its client; the call lingers until reaped */
static void answer (call *c, int st) {
  pf_icall_answer(&c->c, st);
  ev_io_stop(EV_DEFAULT, &c->io);
}


/* the executor ended: its status to the client, the call is done, and
** only now the spare it took is replaced (its client and its teardown
** are out of the way) */
static void childcb (struct ev_loop *loop, ev_child *w, int revents) {
  call *c = (call *)w->data;
  int st = w->rstatus;
  pid_t pid = c->c.pid;
  (void)loop; (void)revents;
  ev_child_stop(EV_DEFAULT, w);
  c->c.pid = 0;  /* reaped: its group is no longer ours to signal */
  if (c->c.early >= 0 && c->c.early != st)
    pf_ilog(0, LOG_WARNING, "executor %ld: reported status %d, ended with %d",
         (long)pid, c->c.early, st);
  if (c->c.early < 0 || c->c.byexec)  /* (its answer may have failed: this
                                      ** one too; a client reads the first) */
    answer(c, st);
  if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)
      && !(WIFSIGNALED(st) && WTERMSIG(st) == SIGPIPE))
    pf_ilog(0, LOG_INFO, "executor %ld: status %d", (long)pid, st);
  freecall(c);
  pf_ispare_topup();
}


/* early statuses (interp_exec.c): the client is answered at once (by the
** executor itself, when its report says so), the reaped status is only
** checked */
static void takereports (void) {
  struct signalfd_siginfo si;
  if (S.sigfd < 0) return;
  while (read(S.sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
    call *c;
    if (si.ssi_code != SI_QUEUE || si.ssi_uid != (uint32_t)S.uid)
      continue;
    for (c = S.calls; c != NULL; c = c->next) {
      if (c->c.pid > 0 && c->c.pid == (pid_t)si.ssi_pid && c->c.early < 0) {
        int st = (si.ssi_int & 0xff) << 8;  /* W_EXITCODE(code, 0) */
        if (si.ssi_int & PF_REPORTSENDS) {  /* the executor answers */
          pf_icall_answered(&c->c, st);
          ev_io_stop(EV_DEFAULT, &c->io);
        }
        else {
          c->c.early = st;
          answer(c, st);
        }
        break;
      }
    }
  }
}


static void reportcb (struct ev_loop *loop, ev_io *w, int revents) {
  (void)loop; (void)w; (void)revents;
  takereports();
}


static call *newcall (int fd, int init, pid_t peer) {
  call *c = (call *)calloc(1, sizeof(call));
  int r;
  if (c == NULL) {
    pf_ilog(0, LOG_ERR, "call: not enough memory");
    close(fd);
    return NULL;
  }
  c->c.fd = fd;
  c->init = init;
  c->peer = peer;
  c->next = S.calls;
  S.calls = c;
  S.ncalls++;
  S.npending++;
  ev_timer_stop(EV_DEFAULT, &S.idle);
  ev_io_init(&c->io, requestcb, fd, EV_READ);
  c->io.data = c;
  ev_timer_init(&c->timer, timeoutcb, PF_INTERP_REQTIMEOUT, 0);
  c->timer.data = c;
  ev_child_init(&c->child, childcb, 0, 0);
  c->child.data = c;
  if ((r = pf_icall_greet(&c->c)) <= 0) {
    if (r == 0) freecall(c);
    else callerror(c, "greeting", errno);
    return NULL;
  }
  ev_io_start(EV_DEFAULT, &c->io);
  ev_timer_start(EV_DEFAULT, &c->timer);
  return c;
}


/* a call with a slot to a ready spare: 1 when the spare has it */
static int takespare (call *c) {
  pid_t pid;
  if (!pf_ispare_take(&c->c.job, &pid)) return 0;
  started(c, pid);
  return 1;
}


/* fork the executor of a queued call with a slot: in the child its job */
static pf_ijob *spawn (call *c) {
  pid_t pid = pf_fork();
  if (pid == 0) {
    pf_iexec_become(&c->c.job);
    return &c->c.job;
  }
  if (pid < 0) {
    callerror(c, "fork", errno);
    return NULL;
  }
  setpgid(pid, pid);  /* as the child does: whichever comes first */
  started(c, pid);
  return NULL;
}

/* }====================================================== */


/* {======================================================
** Accepting, autoreload, the watcher, idling
** ======================================================= */

static void startlistening (void) {
  if (!S.draining && S.o.env.fd[0] >= 0
      && S.npending < PF_INTERP_MAXPENDING
      && (S.o.max_servers < 0 || S.nheld + S.nwaiting < S.o.max_servers))
    ev_io_start(EV_DEFAULT, &S.lw);
  else
    ev_io_stop(EV_DEFAULT, &S.lw);
}


/* stop accepting (queued clients see a reset and start a fresh server);
** exit with code once the calls under way are done */
static void drain (int code) {
  if (!S.draining) S.exitcode = code;
  S.draining = 1;
  pf_ispare_stop();
  ev_io_stop(EV_DEFAULT, &S.lw);
  ev_io_stop(EV_DEFAULT, &S.ww);
  ev_timer_stop(EV_DEFAULT, &S.idle);
  if (S.o.env.fd[0] >= 0) close(S.o.env.fd[0]);
  S.o.env.fd[0] = -1;
  if (S.ncalls == 0) ev_break(EV_DEFAULT, EVBREAK_ALL);
}


/* is a file newer than the server? 1 (reload), 0, -1 stat failed */
static int stale (void) {
  int i;
  for (i = 0; i < S.o.nfiles; i++) {
    struct stat st;
    if (stat(S.o.files[i], &st) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) continue;
      pf_ilog(0, LOG_ERR, "autoreload: stat %s: %s", S.o.files[i],
           strerror(errno));
      return -1;
    }
    if (st.st_mtim.tv_sec > S.o.env.sec
        || (st.st_mtim.tv_sec == S.o.env.sec
            && st.st_mtim.tv_nsec > S.o.env.nsec)) {
      pf_ilog(0, LOG_INFO, "reloading; due to %s", S.o.files[i]);
      return 1;
    }
  }
  return 0;
}


/* one connection: a call if it comes from our uid */
static void takeconn (int fd) {
  struct ucred cr;
  socklen_t len = sizeof(cr);
  cr.uid = (uid_t)-1;
  cr.pid = 0;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0
      || cr.uid != S.uid) {
    pf_ilog(0, LOG_ERR, "refused a connection from uid %ld (pid %ld)",
         (long)cr.uid, (long)cr.pid);
    close(fd);
    counterror();
  }
  else
    newcall(fd, 0, cr.pid);
}


static void listencb (struct ev_loop *loop, ev_io *w, int revents) {
  int st;
  (void)loop; (void)w; (void)revents;
  if ((st = stale()) != 0) {
    drain(st > 0 ? 0 : 127);
    return;
  }
  while (ev_is_active(&S.lw)) {
    int fd = accept4(S.o.env.fd[0], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR
          && errno != ECONNABORTED) {
        pf_ilog(0, LOG_ERR, "accept: %s", strerror(errno));
        counterror();
      }
      break;
    }
    takeconn(fd);
    startlistening();
  }
}


/* the watcher's output: a message is an error, EOF means our socket was
** replaced or removed */
static void watchcb (struct ev_loop *loop, ev_io *w, int revents) {
  char buf[2048];
  ssize_t n;
  (void)loop; (void)revents;
  n = read(w->fd, buf, sizeof(buf) - 1);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n > 0) {
    buf[n] = '\0';
    pf_ilog(0, LOG_ERR, "watcher: %s", buf);
    drain(127);
  }
  else {
    pf_ilog(0, LOG_INFO, "lost socket (fresh start or cleanup?), quitting");
    drain(0);
  }
}


static void idlecb (struct ev_loop *loop, ev_timer *w, int revents) {
  (void)loop; (void)w; (void)revents;
  if (S.ncalls == 0) {
    pf_ilog(0, LOG_INFO, "idle timeout, quitting");
    drain(0);
  }
}

/* }====================================================== */


/* {======================================================
** Start and loop
** ======================================================= */

/* in a new child: nothing of the server's loop or calls survives */
static void forget (void *ud) {
  call *c;
  (void)ud;
  ev_io_stop(EV_DEFAULT, &S.lw);
  ev_io_stop(EV_DEFAULT, &S.ww);
  ev_timer_stop(EV_DEFAULT, &S.idle);
  ev_io_stop(EV_DEFAULT, &S.sw);
  pf_ispare_forget();
  for (c = S.calls; c != NULL; c = c->next) {
    ev_io_stop(EV_DEFAULT, &c->io);
    ev_timer_stop(EV_DEFAULT, &c->timer);
    ev_child_stop(EV_DEFAULT, &c->child);
  }
  pf_ilog_forget();
}


/* setup's exit lets the wrapper go on; the child is the server, in a
** session of its own, its fds 0 1 2 on /dev/null */
static void daemonize (lua_State *L) {
  int i, devnull, first;
  pid_t pid;
  fflush(NULL);
  if ((pid = fork()) < 0) luaL_error(L, "fork: %s", strerror(errno));
  if (pid > 0) _exit(0);
  setsid();
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, SIG_DFL);
  first = fcntl(2, F_DUPFD_CLOEXEC, 3);  /* for the first call's errors */
  if ((devnull = open("/dev/null", O_RDWR)) >= 0) {
    for (i = 0; i < 3; i++) dup2(devnull, i);
    if (devnull > 2) close(devnull);
  }
  pf_ilog_setup(L, S.o.syslog, first);
  for (i = 0; i < 4; i++)
    fcntl(S.o.env.fd[i], F_SETFD, FD_CLOEXEC);
  fcntl(S.o.env.fd[0], F_SETFL, fcntl(S.o.env.fd[0], F_GETFL) | O_NONBLOCK);
  fcntl(S.o.env.fd[1], F_SETFL, fcntl(S.o.env.fd[1], F_GETFL) | O_NONBLOCK);
  fcntl(S.o.env.fd[3], F_SETFL, fcntl(S.o.env.fd[3], F_GETFL) | O_NONBLOCK);
}


/* early statuses: PF_SIGREPORT blocked, read from a signalfd */
static void reports (void) {
  sigset_t rs;
  sigemptyset(&rs);
  sigaddset(&rs, PF_SIGREPORT);
  sigprocmask(SIG_BLOCK, &rs, NULL);
  S.sigfd = signalfd(-1, &rs, SFD_NONBLOCK | SFD_CLOEXEC);
  ev_io_init(&S.sw, reportcb, S.sigfd, EV_READ);
  ev_set_priority(&S.sw, EV_MAXPRI);  /* reports first (signalscb takes
                                       ** them too, before an EOF counts) */
  if (S.sigfd >= 0) ev_io_start(EV_DEFAULT, &S.sw);
}


/* what the executors need of the server */
static void execsetup (void) {
  pf_iexeccfg x;
  x.keep = S.o.keep;
  x.nkeep = S.o.nkeep;
  x.argv0 = S.argv0;
  x.sparetitle = S.o.sparetitle;
  x.makertitle = S.o.makertitle;
  x.server = S.self;
  x.report = S.sigfd >= 0;
  x.syslog = S.o.syslog;
  pf_iexec_setup(&x);
}


/* a spare is ready: the calls that wait for one */
static void kickcb (struct ev_loop *loop, ev_idle *w, int revents) {
  (void)loop; (void)w; (void)revents;
  startqueue();
}


/* the watchers of the server's loop */
static void watchers (void) {
  ev_io_init(&S.lw, listencb, S.o.env.fd[0], EV_READ);
  ev_io_init(&S.ww, watchcb, S.o.env.fd[3], EV_READ);
  ev_timer_init(&S.idle, idlecb, 0, 0);
  ev_io_start(EV_DEFAULT, &S.ww);
  ev_idle_init(&S.kick, kickcb);
  pf_ispare_init(S.o.env.fd[0] >= 0 && S.o.idle_timeout != 0,
                 (ev_watcher *)&S.kick);
}


/*
** Become the server of the options o (PREFORK_INTERP checked, files
** open): the wrapper's setup process exits, the server goes on here, and
** the first call waits for pf_iserver_run.
*/
void pf_iserver_start (lua_State *L, pf_iopts *o) {
  S.o = *o;
  S.argv0 = strdup(program_invocation_name);
  S.uid = getuid();
  unsetenv("PREFORK_INTERP");
  daemonize(L);
  S.self = getpid();
  if (S.o.servertitle != NULL) pf_settitle(S.o.servertitle);
  if (pf_loop() == NULL) {
    pf_ilog(0, LOG_ERR, "libev: cannot make the default loop");
    _exit(127);
  }
  pf_onfork(forget, NULL);
  watchers();
  reports();
  execsetup();
  newcall(S.o.env.fd[1], 1, 0);  /* the wrapper's first call */
  startlistening();
  if (S.ncalls == 0 && S.o.idle_timeout >= 0) {
    ev_timer_set(&S.idle, S.o.idle_timeout, 0);
    ev_timer_start(EV_DEFAULT, &S.idle);
  }
}


/* the server is done: its spares and maker gone first */
static void quit (void) {
  pf_onfork(NULL, NULL);
  pf_ispare_wait();
  _exit(S.exitcode);
}


/* what the loop left to do: the forks; in a child, its job */
static pf_ijob *forks (void) {
  call *c = S.queue;
  S.wantfork = 0;
  while (c != NULL) {
    if (!c->held) c = c->qnext;
    else {
      pf_ijob *j = spawn(c);  /* (c started or failed: out of the queue) */
      if (j != NULL) return j;
      c = S.queue;
    }
  }
  return pf_ispare_fork();
}


/* Serve until the server quits (it exits here). Returns only in an
** executor: its call's job. */
pf_ijob *pf_iserver_run (void) {
  for (;;) {
    pf_ijob *j = forks();
    if (j != NULL) return j;
    if (S.draining && S.ncalls == 0) quit();
    ev_run(EV_DEFAULT, 0);
  }
}

/* }====================================================== */
