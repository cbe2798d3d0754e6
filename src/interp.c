/*
** interp.c: the server side of chiark-utils' prefork-interp protocol
** (wire-compatible with Debian's /usr/bin/prefork-interp 7.0.0).
**
** Process model: one fork per call. The server (the initialised script,
** setsid'd) runs the module's libev loop; it accepts, checks the peer's
** uid, sends the greeting and reads the request itself, without blocking,
** on libev. Once a request is complete it forks the executor, which gets
** a process group of its own, the caller's fds 0/1/2, environment and
** argv, and returns into the script. The server then plays upstream's
** "monitor" for that call: bytes the client sends are signals for the
** executor's group, EOF means the client is gone (SIGINT to the group),
** and the executor's wait status, reaped by libev, goes back as a
** big-endian u32. The first call comes on the CALL socketpair.
**
** Two things keep the server's large heap off a warm call's path. A
** spare executor, forked ahead while the server is idle, takes the next
** call (see "A spare executor"); and an executor that ends by exiting
** says its code first (see "An early status"), so the caller need not
** wait for the kernel to take its copy of the heap apart.
*/

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <ev.h>

#include "prefork.h"


/* {======================================================
** Wire: PREFORK_INTERP, the greeting, the request (pure; fuzzed)
** ======================================================= */

/* PREFORK_INTERP: "v1,SECS.NSECS[,...] LISTEN,CALL,WATCHI,WATCHE[,...][ ...]".
** NULL when good, else what is wrong */
const char *pf_interp_parseenv (const char *s, pf_interp_env *e) {
  const char *p = s;
  int i;
  unsigned long long sec = 0;
  long nsec = 0;
  if (strncmp(p, "v1", 2) != 0 || (p[2] != ',' && p[2] != ' ' && p[2] != '\0'))
    return "not version v1";
  p += 2;
  if (*p != ',') return "no mtime";
  p++;
  if (*p < '0' || *p > '9') return "bad mtime";
  for (; *p >= '0' && *p <= '9'; p++) {
    if (sec > (unsigned long long)LLONG_MAX / 10 - 1) return "bad mtime";
    sec = sec * 10 + (unsigned)(*p - '0');
  }
  if (*p++ != '.') return "bad mtime";
  for (i = 0; i < 9; i++, p++) {
    if (*p < '0' || *p > '9') return "bad mtime (nanoseconds)";
    nsec = nsec * 10 + (*p - '0');
  }
  if (*p != ',' && *p != ' ') return "bad mtime (nanoseconds)";
  while (*p != ' ' && *p != '\0') p++;  /* extra items: for extensions */
  if (*p != ' ') return "no fds";
  p++;
  for (i = 0; i < 4; i++) {
    long fd = 0;
    if (*p < '0' || *p > '9') return "bad fd list";
    for (; *p >= '0' && *p <= '9'; p++) {
      fd = fd * 10 + (*p - '0');
      if (fd > INT_MAX) return "bad fd list";
    }
    e->fd[i] = (int)fd;
    if (i < 3 && *p++ != ',') return "fewer than 4 fds";
  }
  if (*p != ',' && *p != ' ' && *p != '\0') return "bad fd list";
  e->mtime.tv_sec = (time_t)sec;
  e->mtime.tv_nsec = nsec;
  return NULL;
}


/* the greeting: "PFI\n" and a u32 length of extra data, always 0 (the
** Debian client reads it in host order); its length */
size_t pf_interp_greeting (unsigned char *buf) {
  memcpy(buf, "PFI\n\0\0\0\0", PF_INTERP_GREETLEN);
  return PF_INTERP_GREETLEN;
}


/*
** The request: NUL-terminated strings, the environment (each with '='),
** an empty string, then argv (at least one). Parsed in place: r->env and
** r->argv point into buf, which must outlive them. NULL when good.
*/
const char *pf_interp_parsereq (char *buf, size_t len, pf_interp_req *r) {
  size_t i, n = 0, start;
  int inenv = 1;
  r->nenv = r->nargv = 0;
  r->env = r->argv = NULL;
  if (len > PF_INTERP_MAXREQ) return "request too long";
  if (len == 0 || buf[len - 1] != '\0') return "request not NUL-terminated";
  for (i = 0; i < len; i++)
    if (buf[i] == '\0') n++;  /* strings */
  r->env = (char **)calloc(n + 2, sizeof(char *));
  if (r->env == NULL) return "out of memory";
  for (start = 0, i = 0; i < len; i++) {
    if (buf[i] != '\0') continue;
    if (inenv && i == start) {  /* the empty string: argv follows */
      inenv = 0;
      r->argv = r->env + r->nenv + 1;
    }
    else if (inenv) {
      if (memchr(buf + start, '=', i - start) == NULL) {
        free(r->env);
        r->env = r->argv = NULL;
        r->nenv = 0;
        return "environment entry without '='";
      }
      r->env[r->nenv++] = buf + start;
    }
    else
      r->argv[r->nargv++] = buf + start;
    start = i + 1;
  }
  if (inenv || r->nargv < 1) {
    free(r->env);
    r->env = r->argv = NULL;
    r->nenv = r->nargv = 0;
    return inenv ? "no end of the environment" : "no argv";
  }
  r->env[r->nenv] = NULL;
  r->argv[r->nargv] = NULL;
  return NULL;
}

/* }====================================================== */


/* {======================================================
** Server state
** ======================================================= */

enum { SIGBYTE, FDS, LEN, BODY, RUN, GONE };

typedef struct call {
  struct call *next;  /* S.calls */
  struct call *rnext;  /* S.ready */
  ev_io io;  /* the connection */
  ev_timer timer;  /* the request's deadline */
  ev_child child;  /* the executor */
  int fd;
  int init;  /* the first call (CALL socketpair) */
  int state;
  int fds[3], nfds;
  unsigned char lenb[4];
  size_t got;
  size_t mlen;
  char *req;
  pf_interp_req r;
  pid_t pid;
  int early;  /* the status sent to the client early, or -1 */
} call;


static struct {
  lua_State *L;
  int listen, watchi, watche, initerr, devnull;
  struct timespec base;  /* PREFORK_INTERP's mtime */
  char **files;  /* autoreload list */
  int nfiles;
  int *keep;  /* fds the executor keeps (sorted) */
  int nkeep;
  long max_servers;
  double idle_timeout;
  long max_errors, errors;
  int syslog;
  int ncalls;
  int draining;  /* stop accepting; exit with exitcode once ncalls == 0 */
  int exitcode;
  call *calls;
  call *ready;  /* request complete: fork its executor (outside ev_run) */
  ev_io lw, ww;
  ev_timer idle;
  char *argv0;  /* this program's argv[0], before the titles */
  char *sparetitle;
  pid_t self;  /* the server, to which executors report */
  int sigfd;  /* signalfd of SIGREPORT: early statuses */
  ev_io sw;
  pid_t spare;  /* an executor forked ahead, waiting for a call; or 0 */
  int sparefd;  /* the server's end of its channel */
  int wantspare;  /* fork one (outside ev_run) */
  pid_t dropped;  /* the last spare killed */
  ev_child sparew;
} S;


/* an executor's "I exit with this code" (sigqueue'd, with the code) */
#define SIGREPORT	(SIGRTMIN + 3)


static const char *prioname (int prio) {
  switch (prio) {
    case LOG_ERR: return "error";
    case LOG_WARNING: return "warning";
    default: return "info";
  }
}


/* a line to syslog, to the Lua log sink if one is set, and for the first
** call to the first caller's stderr */
static void slog (call *c, int prio, const char *fmt, ...) PF_PRINTF(3, 4);
static void slog (call *c, int prio, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (S.syslog)
    syslog(prio, "%s", msg);
  if (S.L != NULL) {
    int t = lua_getfield(S.L, LUA_REGISTRYINDEX, "prefork.log");
    lua_pop(S.L, 1);
    if (t == LUA_TFUNCTION)
      pf_log(S.L, prioname(prio), "interp: %s", msg);
  }
  if (c != NULL && c->init && S.initerr >= 0 && prio <= LOG_WARNING) {
    char line[1100];
    int n = snprintf(line, sizeof(line), "prefork-interp: %s\n", msg);
    if (n > 0)
      (void)!write(S.initerr, line, (size_t)n < sizeof(line) ? (size_t)n
                                                           : sizeof(line) - 1);
  }
}


static void drain (int code);


/* an error counted against max_errors */
static void counterror (void) {
  if (S.max_errors >= 0 && ++S.errors > S.max_errors && !S.draining) {
    slog(NULL, LOG_ERR, "too many errors (%ld), quitting", S.errors);
    drain(127);
  }
}

/* }====================================================== */


/* {======================================================
** Calls
** ======================================================= */

static void startlistening (void);


static void freecall (call *c) {
  call **p;
  int i;
  for (p = &S.calls; *p != NULL; p = &(*p)->next)
    if (*p == c) { *p = c->next; break; }
  ev_io_stop(EV_DEFAULT, &c->io);
  ev_timer_stop(EV_DEFAULT, &c->timer);
  ev_child_stop(EV_DEFAULT, &c->child);
  if (c->fd >= 0) close(c->fd);
  for (i = 0; i < c->nfds; i++) close(c->fds[i]);
  if (c->init && S.initerr >= 0) {  /* the first caller's stderr */
    close(S.initerr);
    S.initerr = -1;
  }
  free(c->r.env);
  free(c->req);
  free(c);
  S.ncalls--;
  if (S.ncalls == 0) {
    if (S.draining) ev_break(EV_DEFAULT, EVBREAK_ALL);
    else if (S.idle_timeout >= 0) {
      ev_timer_set(&S.idle, S.idle_timeout, 0);
      ev_timer_start(EV_DEFAULT, &S.idle);
    }
  }
  startlistening();
}


/* a bad call: say why, close it, no executor */
static void callerror (call *c, const char *what, int en) {
  if (en != 0)
    slog(c, LOG_ERR, "call: %s: %s", what, strerror(en));
  else
    slog(c, LOG_ERR, "call: %s", what);
  freecall(c);
  counterror();
}


/* one byte, and an fd when it brings one: 1, 0 EOF, -1 errno */
static int recvbyte (int fd, unsigned char *b, int *got) {
  return (int)pf_recvfdmsg(fd, got, b, 1, MSG_DONTWAIT, NULL);
}


/* the signals a client may forward */
static int forwardable (int sig) {
  return sig == SIGINT || sig == SIGTERM || sig == SIGHUP || sig == SIGQUIT
      || sig == SIGUSR1 || sig == SIGUSR2 || sig == SIGWINCH;
}


/* bytes after the request: signals; EOF: the client is gone */
static void running (call *c) {
  unsigned char buf[64];
  for (;;) {
    ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
    ssize_t i;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {  /* EOF or a reset: the client went away */
      ev_io_stop(EV_DEFAULT, &c->io);
      c->state = GONE;
      if (c->pid > 0) kill(-c->pid, SIGINT);
      return;
    }
    for (i = 0; i < n; i++) {
      if (c->pid > 0 && forwardable(buf[i]))
        kill(-c->pid, buf[i]);
      else if (!forwardable(buf[i]))
        slog(c, LOG_WARNING, "call: ignored signal byte %d", buf[i]);
    }
  }
}


/* the connection is readable: the next step of the request */
static void callcb (struct ev_loop *loop, ev_io *w, int revents) {
  call *c = (call *)w->data;
  (void)loop; (void)revents;
  for (;;) {
    unsigned char b;
    ssize_t n;
    int fd;
    switch (c->state) {
      case SIGBYTE: case FDS:
        n = recvbyte(c->fd, &b, &fd);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n < 0) { callerror(c, "recvmsg", errno); return; }
        if (n == 0) {  /* the client gave up before asking: not an error */
          slog(c, LOG_INFO, "call: client went away before its request");
          freecall(c);
          return;
        }
        if (c->state == SIGBYTE) {
          if (fd >= 0) close(fd);
          if (b != 0) { callerror(c, "bad signalling byte", 0); return; }
          c->state = FDS;
        }
        else {
          if (fd < 0) { callerror(c, "a message without an fd", 0); return; }
          c->fds[c->nfds++] = fd;
          if (c->nfds == 3) { c->state = LEN; c->got = 0; }
        }
        break;
      case LEN: case BODY: {
        char *dst = c->state == LEN ? (char *)c->lenb + c->got
                                    : c->req + c->got;
        size_t want = (c->state == LEN ? 4 : c->mlen) - c->got;
        n = want == 0 ? 0 : recv(c->fd, dst, want, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) break;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n < 0) { callerror(c, "recv", errno); return; }
        if (n == 0 && want > 0) {
          callerror(c, "end of stream in the request", 0);
          return;
        }
        c->got += (size_t)n;
        if (c->state == LEN && c->got == 4) {
          c->mlen = ((size_t)c->lenb[0] << 24) | ((size_t)c->lenb[1] << 16)
                  | ((size_t)c->lenb[2] << 8) | (size_t)c->lenb[3];
          if (c->mlen > PF_INTERP_MAXREQ) {
            callerror(c, "request too long", 0);
            return;
          }
          c->req = (char *)malloc(c->mlen + 1);
          if (c->req == NULL) { callerror(c, "malloc", ENOMEM); return; }
          c->state = BODY;
          c->got = 0;
        }
        if (c->state == BODY && c->got == c->mlen) {
          const char *err = pf_interp_parsereq(c->req, c->mlen, &c->r);
          if (err != NULL) { callerror(c, err, 0); return; }
          c->state = RUN;
          ev_timer_stop(EV_DEFAULT, &c->timer);
          ev_io_stop(EV_DEFAULT, &c->io);  /* again once forked */
          c->rnext = NULL;
          if (S.ready == NULL) S.ready = c;
          else {
            call *q = S.ready;
            while (q->rnext != NULL) q = q->rnext;
            q->rnext = c;
          }
          ev_break(EV_DEFAULT, EVBREAK_ALL);
          return;
        }
        break;
      }
      default:
        running(c);
        return;
    }
  }
}


static void timeoutcb (struct ev_loop *loop, ev_timer *w, int revents) {
  (void)loop; (void)revents;
  callerror((call *)w->data, "no complete request in time", 0);
}


/* the status of a call to its client, unless the client is gone; then
** no more bytes from it, and the next spare once the loop is left */
static void answer (call *c, int st) {
  if (c->state == RUN)  /* read what is there: an EOF */
    running(c);
  if (c->state == RUN) {
    unsigned char b[4];
    unsigned u = (unsigned)st;
    b[0] = (unsigned char)(u >> 24); b[1] = (unsigned char)(u >> 16);
    b[2] = (unsigned char)(u >> 8); b[3] = (unsigned char)u;
    (void)!send(c->fd, b, 4, MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  ev_io_stop(EV_DEFAULT, &c->io);
  c->state = GONE;
  S.wantspare = 1;
  ev_break(EV_DEFAULT, EVBREAK_ALL);
}


/* the executor ended: its status to the client, and the call is done */
static void childcb (struct ev_loop *loop, ev_child *w, int revents) {
  call *c = (call *)w->data;
  int st = w->rstatus;
  pid_t pid = c->pid;
  (void)loop; (void)revents;
  ev_child_stop(EV_DEFAULT, w);
  c->pid = 0;  /* reaped: its group is no longer ours to signal */
  if (c->early < 0)
    answer(c, st);
  else if (c->early != st)
    slog(NULL, LOG_WARNING, "executor %ld: reported status %d, ended with %d",
         (long)pid, c->early, st);
  if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0)
      && !(WIFSIGNALED(st) && WTERMSIG(st) == SIGPIPE))
    slog(NULL, LOG_INFO, "executor %ld: status %d", (long)pid, st);
  freecall(c);
}


/* {------------------------------------------------------
** An early status. An executor ends with a large address space, mostly
** shared with the server; the kernel's taking it apart (a millisecond
** for 20 MB) comes before the SIGCHLD. So an executor that exits (the
** end of the script, os.exit, an uncaught error) flushes its output,
** closes every fd, as its exit would, and sigqueues SIGREPORT with its
** code to the server, which answers the client at once; the reaped
** status is then only checked. A death by a signal has no early status.
** ------------------------------------------------------- */

static void reportcb (struct ev_loop *loop, ev_io *w, int revents) {
  struct signalfd_siginfo si;
  (void)loop; (void)revents;
  while (read(w->fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
    call *c;
    if (si.ssi_code != SI_QUEUE || si.ssi_uid != (uint32_t)getuid())
      continue;
    for (c = S.calls; c != NULL; c = c->next) {
      if (c->pid > 0 && c->pid == (pid_t)si.ssi_pid && c->early < 0) {
        c->early = (si.ssi_int & 0xff) << 8;  /* W_EXITCODE(code, 0) */
        answer(c, c->early);
        break;
      }
    }
  }
}

/* }------------------------------------------------------ */


static call *newcall (int fd, int init) {
  unsigned char g[PF_INTERP_GREETLEN];
  size_t n = pf_interp_greeting(g);
  call *c = (call *)calloc(1, sizeof(call));
  if (c == NULL) {
    slog(NULL, LOG_ERR, "call: out of memory");
    close(fd);
    return NULL;
  }
  c->fd = fd;
  c->init = init;
  c->early = -1;
  c->state = SIGBYTE;
  c->next = S.calls;
  S.calls = c;
  S.ncalls++;
  ev_timer_stop(EV_DEFAULT, &S.idle);
  ev_io_init(&c->io, callcb, fd, EV_READ);
  c->io.data = c;
  ev_timer_init(&c->timer, timeoutcb, PF_INTERP_REQTIMEOUT, 0);
  c->timer.data = c;
  ev_child_init(&c->child, childcb, 0, 0);
  c->child.data = c;
  if (send(fd, g, n, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)n) {
    if (errno == EPIPE || errno == ECONNRESET) freecall(c);
    else callerror(c, "greeting", errno);
    return NULL;
  }
  ev_io_start(EV_DEFAULT, &c->io);
  ev_timer_start(EV_DEFAULT, &c->timer);
  return c;
}

/* }====================================================== */


/* {======================================================
** Accepting, autoreload, the watcher, idling
** ======================================================= */

static void stoplistening (void) {
  ev_io_stop(EV_DEFAULT, &S.lw);
}


static void startlistening (void) {
  if (!S.draining && S.listen >= 0
      && (S.max_servers < 0 || S.ncalls < S.max_servers))
    ev_io_start(EV_DEFAULT, &S.lw);
  else
    stoplistening();
}


/* stop accepting (queued clients see a reset and start a fresh server);
** exit with code once the calls under way are done */
static void dropspare (void);

static void drain (int code) {
  if (!S.draining) S.exitcode = code;
  S.draining = 1;
  dropspare();
  stoplistening();
  ev_io_stop(EV_DEFAULT, &S.ww);
  ev_timer_stop(EV_DEFAULT, &S.idle);
  if (S.listen >= 0) close(S.listen);
  S.listen = -1;
  if (S.ncalls == 0) ev_break(EV_DEFAULT, EVBREAK_ALL);
}


/* is a file newer than the server? 1 (reload), 0, -1 stat failed */
static int stale (void) {
  int i;
  for (i = 0; i < S.nfiles; i++) {
    struct stat st;
    if (stat(S.files[i], &st) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) continue;
      slog(NULL, LOG_ERR, "autoreload: stat %s: %s", S.files[i],
           strerror(errno));
      return -1;
    }
    if (st.st_mtim.tv_sec > S.base.tv_sec
        || (st.st_mtim.tv_sec == S.base.tv_sec
            && st.st_mtim.tv_nsec > S.base.tv_nsec)) {
      slog(NULL, LOG_INFO, "reloading; due to %s", S.files[i]);
      return 1;
    }
  }
  return 0;
}


static void listencb (struct ev_loop *loop, ev_io *w, int revents) {
  int st;
  (void)loop; (void)w; (void)revents;
  if ((st = stale()) != 0) {
    drain(st > 0 ? 0 : 127);
    return;
  }
  while (!S.draining && (S.max_servers < 0 || S.ncalls < S.max_servers)) {
    struct ucred cr;
    socklen_t len = sizeof(cr);
    int fd = accept4(S.listen, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR
          || errno == ECONNABORTED)
        break;
      slog(NULL, LOG_ERR, "accept: %s", strerror(errno));
      counterror();
      break;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0
        || cr.uid != getuid()) {
      slog(NULL, LOG_ERR, "refused a connection from uid %ld (pid %ld)",
           (long)cr.uid, (long)cr.pid);
      close(fd);
      counterror();
      continue;
    }
    newcall(fd, 0);
  }
  startlistening();
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
    slog(NULL, LOG_ERR, "watcher: %s", buf);
    drain(127);
  }
  else {
    slog(NULL, LOG_INFO, "lost socket (fresh start or cleanup?), quitting");
    drain(0);
  }
}


static void idlecb (struct ev_loop *loop, ev_timer *w, int revents) {
  (void)loop; (void)w; (void)revents;
  if (S.ncalls == 0) {
    slog(NULL, LOG_INFO, "idle timeout, quitting");
    drain(0);
  }
}

/* }====================================================== */


/* {======================================================
** The executor
** ======================================================= */

/* in a new child: nothing of the server's loop or calls survives */
static void forget (void *ud) {
  call *c;
  (void)ud;
  ev_io_stop(EV_DEFAULT, &S.lw);
  ev_io_stop(EV_DEFAULT, &S.ww);
  ev_timer_stop(EV_DEFAULT, &S.idle);
  ev_io_stop(EV_DEFAULT, &S.sw);
  ev_child_stop(EV_DEFAULT, &S.sparew);
  for (c = S.calls; c != NULL; c = c->next) {
    ev_io_stop(EV_DEFAULT, &c->io);
    ev_timer_stop(EV_DEFAULT, &c->timer);
    ev_child_stop(EV_DEFAULT, &c->child);
  }
}


static int cmpint (const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}


/* close every fd from 3 up, but those in S.keep and also (if >= 0) */
static void closeabove (int also) {
  int i, lo = 3, n = S.nkeep;
  int *keep = (int *)malloc(((size_t)n + 1) * sizeof(int));
  if (keep == NULL) _exit(127);
  memcpy(keep, S.keep, (size_t)n * sizeof(int));
  if (also >= 0) keep[n++] = also;
  qsort(keep, (size_t)n, sizeof(int), cmpint);
  for (i = 0; i <= n; i++) {
    int hi = i < n ? keep[i] - 1 : INT_MAX;
    if (hi >= lo && close_range((unsigned)lo, (unsigned)hi, 0) != 0) {
      int fd;  /* no close_range: one by one, as /proc lists them */
      DIR *d = opendir("/proc/self/fd");
      struct dirent *e;
      int dfd = d != NULL ? dirfd(d) : -1;
      while (d != NULL && (e = readdir(d)) != NULL) {
        fd = atoi(e->d_name);
        if (fd >= lo && fd <= hi && fd != dfd && e->d_name[0] != '.')
          close(fd);
      }
      if (d != NULL) closedir(d);
    }
    if (i < n && keep[i] + 1 > lo) lo = keep[i] + 1;
  }
  free(keep);
}


/* {------------------------------------------------------
** A quick end. At the end of the script lua.c closes the state, which
** frees every object: with a large initialised heap each free writes to
** a page shared with the server, so the executor copies the whole heap
** just to exit (80 ms for 20 MB). A sentinel made when prefork.interp is
** loaded is the oldest object with a finalizer that the script's state
** knows, so lua_close finalizes it after every newer one: in an
** executor it flushes stdio and _exits with the status lua.c would have
** returned. That status is 1 when lua.c reported an uncaught error on
** stderr (the global stderr: io.stderr keeps its own FILE, so only C code
** such as lua.c's report writes here), the code of os.exit(code, true),
** else 0.
** ------------------------------------------------------- */

static int inexec = 0;  /* this process is an executor */
static int errored = 0;  /* lua.c reported an error */
static int exitcode = -1;  /* os.exit(code, true) */


static ssize_t errwrite (void *cookie, const char *buf, size_t n) {
  static int inwarn = 0;  /* lauxlib writes a warning in pieces */
  size_t done = 0;
  (void)cookie;
  if (n >= 13 && strncmp(buf, "Lua warning: ", 13) == 0)
    inwarn = 1;
  else if (inwarn && n == 1 && buf[0] == '\n')
    inwarn = 0;
  else if (!inwarn)
    errored = 1;
  while (done < n) {
    ssize_t w = write(2, buf + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    done += (size_t)w;
  }
  return (ssize_t)n;
}


/* the early status: flushed and closed as by an exit, the code to the
** server (only from the executor itself, not from a child it forked) */
static void report (int code) {
  union sigval v;
  fflush(NULL);
  if (!inexec || S.self <= 0 || S.sigfd < 0 || getppid() != S.self
      || close_range(0, ~0U, 0) != 0)
    return;
  v.sival_int = code & 0xff;
  sigqueue(S.self, SIGREPORT, v);
}


/* exit(3), as os.exit(code) without close calls it */
static void onexit (int status, void *ud) {
  (void)ud;
  report(status);
}


static int sentinel_gc (lua_State *L) {
  (void)L;
  if (inexec) {
    int code = exitcode >= 0 ? exitcode : errored ? EXIT_FAILURE
                                                  : EXIT_SUCCESS;
    report(code);
    _exit(code);
  }
  return 0;
}


/* core.interp_sentinel() -> the userdata whose finalizer ends executors */
static int l_sentinel (lua_State *L) {
  lua_newuserdatauv(L, 1, 0);
  if (luaL_newmetatable(L, "prefork.interp.sentinel")) {
    lua_pushcfunction(L, sentinel_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return 1;
}


/* core.interp_setexit(code): os.exit's code, for a closing os.exit */
static int l_setexit (lua_State *L) {
  if (lua_isboolean(L, 1))
    exitcode = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else
    exitcode = (int)luaL_optinteger(L, 1, EXIT_SUCCESS) & 0xff;
  return 0;
}


static void quickend (void) {
  static const cookie_io_functions_t io = {NULL, errwrite, NULL, NULL};
  FILE *f = fopencookie(NULL, "w", io);
  inexec = 1;
  on_exit(onexit, NULL);
  if (f != NULL) {
    setvbuf(f, NULL, _IONBF, 0);
    stderr = f;
  }
}

/* }------------------------------------------------------ */


/* the executor's side, after the fork, the half that needs no call: a
** group of its own, default signals (still blocked) */
static void prepexec (void) {
  struct sigaction sa;
  int sig;
  setpgid(0, 0);
  if (S.syslog) closelog();
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  for (sig = 1; sig < NSIG; sig++)
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &sa, NULL);
}


/* the other half, with a call: a process of the caller's */
static void enterexec (call *c) {
  sigset_t none;
  int i;
  prctl(PR_SET_PDEATHSIG, SIGINT, 0, 0, 0);  /* the server died: as if gone */
  for (i = 0; i < 3; i++)
    if (dup2(c->fds[i], i) < 0) _exit(127);
  closeabove(-1);
  __fpurge(stdin);
  clearerr(stdin);
  clearerr(stdout);
  clearerr(stderr);
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  clearenv();
  for (i = 0; i < c->r.nenv; i++)
    putenv(c->r.env[i]);  /* the request lives as long as the process */
  unsetenv("PREFORK_INTERP");
  quickend();
  {  /* argv[0] stays this program's (lua.c's progname reads it) */
    const char *argv0 = c->r.argv[0];
    c->r.argv[0] = S.argv0 != NULL ? S.argv0 : c->r.argv[0];
    pf_settitlev((const char *const *)c->r.argv, c->r.nargv);
    c->r.argv[0] = (char *)(size_t)argv0;
  }
}


/* the server's side of an executor that has its call */
static void started (call *c, pid_t pid) {
  c->pid = pid;
  ev_child_set(&c->child, pid, 0);
  ev_child_start(EV_DEFAULT, &c->child);
  ev_io_start(EV_DEFAULT, &c->io);  /* signals and EOF from now on */
  running(c);  /* bytes that came with the request */
}


/* fork the executor of a call whose request is complete: 1 in the child */
static int spawn (call *c) {
  pid_t pid = pf_fork();
  if (pid == 0) {
    prepexec();
    enterexec(c);
    return 1;
  }
  if (pid < 0) {
    callerror(c, "fork", errno);
    return 0;
  }
  setpgid(pid, pid);  /* as the child does: whichever comes first */
  started(c, pid);
  return 0;
}


/* {------------------------------------------------------
** A spare executor. Forking the server is the dearest step of a call
** (the page tables of its heap are copied: a millisecond for 20 MB), so
** once a call is answered the server forks the next call's executor
** ahead. The spare does the half of becoming an executor that needs no
** call, then waits on a socketpair; a complete request goes to it: a u32
** length (host order) and the request, with the caller's three fds
** (SCM_RIGHTS). A call that finds no spare (calls at once, or a spare
** gone) is forked as before. The spare dies with the server.
** ------------------------------------------------------- */

/* the spare is no longer the server's to watch */
static void forgetspare (void) {
  ev_child_stop(EV_DEFAULT, &S.sparew);
  if (S.sparefd >= 0) close(S.sparefd);
  S.spare = 0;
  S.sparefd = -1;
}


static void sparecb (struct ev_loop *loop, ev_child *w, int revents) {
  (void)loop; (void)revents;
  slog(NULL, LOG_WARNING, "spare executor %ld: status %d", (long)S.spare,
       w->rstatus);
  forgetspare();
}


static void dropspare (void) {
  if (S.spare > 0) {
    kill(S.spare, SIGKILL);  /* reaped by the loop, or before the exit */
    S.dropped = S.spare;
  }
  forgetspare();
}


/* fork a spare if there is none: 1 in the spare */
static int forkspare (void) {
  int sv[2];
  pid_t pid;
  S.wantspare = 0;
  if (S.spare > 0 || S.draining || S.listen < 0 || S.idle_timeout == 0
      || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return 0;
  pid = pf_fork();
  if (pid == 0) {
    close(sv[0]);
    S.sparefd = sv[1];
    return 1;
  }
  close(sv[1]);
  if (pid < 0) {
    slog(NULL, LOG_WARNING, "spare executor: fork: %s", strerror(errno));
    close(sv[0]);
    return 0;
  }
  setpgid(pid, pid);
  S.spare = pid;
  S.sparefd = sv[0];
  ev_child_set(&S.sparew, pid, 0);
  ev_child_start(EV_DEFAULT, &S.sparew);
  return 0;
}


/*
** The call to the spare: 1 when the spare has it, 0 when there is no
** spare or it failed (then the call is forked as before). The caller's
** fds go one a message (pf_sendfdmsg), the first with the request's
** length, then the request; nothing blocks: a request too large for the
** socket buffer goes the forking way. The spare answers one byte once it
** has it all; without it (a spare killed a moment ago keeps its socket
** while the kernel takes its memory apart) the call was not taken. That
** wait is bounded (1 s: a stopped spare).
*/
static int handoff (call *c) {
  uint32_t len = (uint32_t)c->mlen;
  struct pollfd p;
  char ack = 0;
  pid_t pid = S.spare;
  if (pid <= 0) return 0;
  p.fd = S.sparefd;
  p.events = POLLIN;
  if (pf_sendfdmsg(p.fd, c->fds[0], &len, sizeof(len), MSG_DONTWAIT)
        == (ssize_t)sizeof(len)
      && pf_sendfdmsg(p.fd, c->fds[1], "", 1, MSG_DONTWAIT) == 1
      && pf_sendfdmsg(p.fd, c->fds[2], "", 1, MSG_DONTWAIT) == 1
      && pf_sendfdmsg(p.fd, -1, c->req, c->mlen, MSG_DONTWAIT)
           == (ssize_t)c->mlen
      && poll(&p, 1, 1000) == 1)
    (void)!recv(p.fd, &ack, 1, MSG_DONTWAIT);
  forgetspare();
  if (ack != 'A') {
    slog(NULL, LOG_WARNING, "spare executor %ld: did not take the call",
         (long)pid);
    kill(pid, SIGKILL);  /* reaped by the loop */
    return 0;
  }
  started(c, pid);
  return 1;
}


/* in the spare: wait for a call, and become its executor */
static call *sparewait (void) {
  uint32_t len;
  sigset_t none;
  size_t got = 0;
  char b;
  int i;
  call *c = (call *)calloc(1, sizeof(call));
  prepexec();
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (c == NULL || getppid() != S.self) _exit(127);
  closeabove(S.sparefd);
  if (S.sparetitle != NULL) pf_settitle(S.sparetitle);
  prctl(PR_SET_NAME, "spare executor", 0, 0, 0);  /* (ps -o comm) */
  /* default signals, unblocked: one sent to the spare acts now (most
  ** kill it), not on the call it would take next */
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (pf_recvfdmsg(S.sparefd, &c->fds[0], &len, sizeof(len), MSG_WAITALL,
                   NULL) != (ssize_t)sizeof(len))
    _exit(0);  /* the server is gone */
  for (i = 1; i < 3; i++)
    if (pf_recvfdmsg(S.sparefd, &c->fds[i], &b, 1, 0, NULL) != 1) _exit(127);
  c->nfds = 3;
  if (c->fds[0] < 0 || c->fds[1] < 0 || c->fds[2] < 0
      || len > PF_INTERP_MAXREQ
      || (c->req = (char *)malloc((size_t)len + 1)) == NULL)
    _exit(127);
  c->mlen = len;
  while (got < c->mlen) {
    ssize_t n = recv(S.sparefd, c->req + got, c->mlen - got, MSG_WAITALL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) _exit(127);
    got += (size_t)n;
  }
  if (pf_interp_parsereq(c->req, c->mlen, &c->r) != NULL
      || send(S.sparefd, "A", 1, MSG_NOSIGNAL) != 1)
    _exit(127);
  enterexec(c);  /* (closes the channel) */
  return c;
}


/* }------------------------------------------------------ */

/* }====================================================== */


/* {======================================================
** The Lua entry
** ======================================================= */

static int syslogfacility (const char *name) {
  static const struct { const char *n; int f; } fac[] = {
    {"LOG_USER", LOG_USER}, {"LOG_DAEMON", LOG_DAEMON},
    {"LOG_LOCAL0", LOG_LOCAL0}, {"LOG_LOCAL1", LOG_LOCAL1},
    {"LOG_LOCAL2", LOG_LOCAL2}, {"LOG_LOCAL3", LOG_LOCAL3},
    {"LOG_LOCAL4", LOG_LOCAL4}, {"LOG_LOCAL5", LOG_LOCAL5},
    {"LOG_LOCAL6", LOG_LOCAL6}, {"LOG_LOCAL7", LOG_LOCAL7},
    {"LOG_MAIL", LOG_MAIL}, {"LOG_AUTH", LOG_AUTH}, {"LOG_CRON", LOG_CRON},
    {"LOG_LPR", LOG_LPR}, {"LOG_NEWS", LOG_NEWS}, {"LOG_UUCP", LOG_UUCP},
    {"LOG_SYSLOG", LOG_SYSLOG}, {"LOG_AUTHPRIV", LOG_AUTHPRIV},
    {NULL, 0}
  };
  int i;
  for (i = 0; fac[i].n != NULL; i++)
    if (strcasecmp(fac[i].n, name) == 0
        || strcasecmp(fac[i].n + 4, name) == 0)
      return fac[i].f;
  return -1;
}


static char **checkstrings (lua_State *L, int t, const char *field, int *n) {
  char **v;
  int i;
  lua_getfield(L, t, field);
  luaL_checktype(L, -1, LUA_TTABLE);
  *n = (int)luaL_len(L, -1);
  v = (char **)calloc((size_t)*n + 1, sizeof(char *));
  if (v == NULL) luaL_error(L, "out of memory");
  for (i = 0; i < *n; i++) {
    const char *s;
    lua_geti(L, -1, i + 1);
    s = lua_tostring(L, -1);
    if (s == NULL || (v[i] = strdup(s)) == NULL)
      luaL_error(L, "interp: %s[%d] is not a string", field, i + 1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return v;
}


static double optnum (lua_State *L, int t, const char *field, double def) {
  double v;
  lua_getfield(L, t, field);
  v = lua_isnil(L, -1) ? def : (double)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}


/*
** Huge pages for the heap. The server's heap is what every fork copies
** the page tables of and every exit takes apart again: 5000 entries for
** 20 MB, a millisecond each way on some virtual machines. Collapsed into
** transparent huge pages (MADV_COLLAPSE, Linux 6.1) it is 10 entries; a
** write to a shared huge page splits only that one (4 KiB copied). Done
** once, when the server starts (tens of ms for 20 MB), on the private
** anonymous mappings (the malloc heap and its mmaps) of 2 MiB and more.
** A kernel without it (EINVAL) or with THP off: nothing happens.
*/
#if !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE	25
#endif

static void hugeheap (void) {
  const unsigned long huge = 2UL << 20;
  char line[512];
  int whole = 1;  /* line starts a line of the file */
  FILE *f = fopen("/proc/self/maps", "re");
  if (f == NULL) return;
  while (fgets(line, sizeof(line), f) != NULL) {
    unsigned long a, b, off, ino;
    char perm[8], dev[16];
    int n = 0, start = whole;
    whole = strchr(line, '\n') != NULL;  /* (else the next one goes on) */
    if (!start || sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &a, &b, perm,
                         &off, dev, &ino, &n) < 6
        || strncmp(perm, "rw-p", 4) != 0 || ino != 0)
      continue;
    if (line[n] != '\n' && line[n] != '\0'
        && strncmp(line + n, "[heap]", 6) != 0)
      continue;  /* the stack, vdso data and the like */
    a = (a + huge - 1) & ~(huge - 1);
    b &= ~(huge - 1);
    if (b > a && madvise((void *)a, b - a, MADV_HUGEPAGE) == 0)
      (void)madvise((void *)a, b - a, MADV_COLLAPSE);
  }
  fclose(f);
}


/*
** core.interp_serve(envvalue, opts) with opts checked by prefork.interp:
** {files = {...}, keep = {fd...}, max_servers, idle_timeout, max_errors,
** log_facility, ident, title}. Returns only in an executor, once per
** call: the request's argv as a list. The server exits from here.
*/
static int l_serve (lua_State *L) {
  pf_interp_env e;
  const char *err = pf_interp_parseenv(luaL_checkstring(L, 1), &e);
  const char *fac;
  int i, facility = LOG_USER, devnull;
  pid_t pid;
  call *first;
  luaL_checktype(L, 2, LUA_TTABLE);
  if (err != NULL)
    return luaL_error(L, "PREFORK_INTERP is malformed: %s", err);
  for (i = 0; i < 4; i++)
    if (fcntl(e.fd[i], F_GETFD) < 0)
      return luaL_error(L, "PREFORK_INTERP: fd %d: %s", e.fd[i],
                        strerror(errno));
  lua_getfield(L, 2, "log_facility");
  fac = luaL_optstring(L, -1, "LOG_USER");
  if (*fac != '\0' && (facility = syslogfacility(fac)) < 0)
    return luaL_error(L, "interp: unknown log_facility '%s'", fac);
  S.syslog = *fac != '\0';
  lua_pop(L, 1);
  S.files = checkstrings(L, 2, "files", &S.nfiles);
  {
    char **k = checkstrings(L, 2, "keep", &S.nkeep);
    S.keep = (int *)calloc((size_t)S.nkeep + 1, sizeof(int));
    for (i = 0; i < S.nkeep; i++) {
      S.keep[i] = k[i] != NULL && S.keep != NULL ? atoi(k[i]) : 0;
      free(k[i]);
    }
    free(k);
    if (S.keep == NULL) return luaL_error(L, "out of memory");
    qsort(S.keep, (size_t)S.nkeep, sizeof(int), cmpint);
    for (i = 0; i < S.nkeep; i++)  /* (a closed one would pass on whatever
                                   ** the server opens there later) */
      if (S.keep[i] < 3 || fcntl(S.keep[i], F_GETFD) < 0)
        return luaL_error(L, "keep_fds: fd %d is not open", S.keep[i]);
  }
  S.max_servers = (long)optnum(L, 2, "max_servers", 4);
  S.idle_timeout = optnum(L, 2, "idle_timeout", 1e6);
  S.max_errors = (long)optnum(L, 2, "max_errors", 100);
  lua_getfield(L, 2, "ident");
  {
    static char ident[512];
    snprintf(ident, sizeof(ident), "%s", luaL_optstring(L, -1, "prefork-interp"));
    if (S.syslog) openlog(ident, LOG_NDELAY | LOG_PID, facility);
  }
  lua_pop(L, 1);
  S.argv0 = strdup(program_invocation_name);
  lua_getfield(L, 2, "sparetitle");
  S.sparetitle = lua_isstring(L, -1) ? strdup(lua_tostring(L, -1)) : NULL;
  lua_pop(L, 1);
  S.spare = 0;
  S.sparefd = -1;
  S.base = e.mtime;
  S.listen = e.fd[0];
  S.watchi = e.fd[2];
  S.watche = e.fd[3];
  S.errors = 0;
  unsetenv("PREFORK_INTERP");
  /* setup's exit lets the wrapper go on; the child is the server */
  fflush(NULL);
  pid = fork();
  if (pid < 0) return luaL_error(L, "fork: %s", strerror(errno));
  if (pid > 0) _exit(0);
  setsid();
  S.self = getpid();
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, SIG_DFL);
  S.initerr = fcntl(2, F_DUPFD_CLOEXEC, 3);  /* for the first call's errors */
  devnull = open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    for (i = 0; i < 3; i++) dup2(devnull, i);
    if (devnull > 2) close(devnull);
  }
  for (i = 0; i < 4; i++)
    fcntl(e.fd[i], F_SETFD, FD_CLOEXEC);
  fcntl(S.listen, F_SETFL, fcntl(S.listen, F_GETFL) | O_NONBLOCK);
  fcntl(e.fd[1], F_SETFL, fcntl(e.fd[1], F_GETFL) | O_NONBLOCK);
  fcntl(S.watche, F_SETFL, fcntl(S.watche, F_GETFL) | O_NONBLOCK);
  lua_getfield(L, 2, "servertitle");
  if (lua_isstring(L, -1)) pf_settitle(lua_tostring(L, -1));
  lua_pop(L, 1);
  if (pf_loop() == NULL) {
    slog(NULL, LOG_ERR, "libev: cannot make the default loop");
    _exit(127);
  }
  S.L = L;
  /* a full collection now leaves the collector paused until the heap
  ** doubles: an executor's own allocations then start no cycle that
  ** would write to (and copy) every page it shares with the server */
  lua_gc(L, LUA_GCCOLLECT);
  hugeheap();
  pf_onfork(forget, NULL);
  ev_io_init(&S.lw, listencb, S.listen, EV_READ);
  ev_io_init(&S.ww, watchcb, S.watche, EV_READ);
  ev_timer_init(&S.idle, idlecb, 0, 0);
  ev_io_start(EV_DEFAULT, &S.ww);
  ev_child_init(&S.sparew, sparecb, 0, 0);
  {  /* early statuses: SIGREPORT blocked, read from a signalfd */
    sigset_t rs;
    sigemptyset(&rs);
    sigaddset(&rs, SIGREPORT);
    sigprocmask(SIG_BLOCK, &rs, NULL);
    S.sigfd = signalfd(-1, &rs, SFD_NONBLOCK | SFD_CLOEXEC);
    ev_io_init(&S.sw, reportcb, S.sigfd, EV_READ);
    if (S.sigfd >= 0) ev_io_start(EV_DEFAULT, &S.sw);
  }
  first = newcall(e.fd[1], 1);  /* the wrapper's fake first call */
  (void)first;
  startlistening();
  if (S.ncalls == 0 && S.idle_timeout >= 0) {
    ev_timer_set(&S.idle, S.idle_timeout, 0);
    ev_timer_start(EV_DEFAULT, &S.idle);
  }
  for (;;) {
    call *c = NULL;
    ev_run(EV_DEFAULT, 0);
    while (c == NULL && S.ready != NULL) {
      call *r = S.ready;
      S.ready = r->rnext;
      if (!handoff(r) && spawn(r)) c = r;
    }
    if (c == NULL && S.draining && S.ncalls == 0) {
      pf_onfork(NULL, NULL);
      if (S.dropped > 0) waitpid(S.dropped, NULL, 0);  /* (or ECHILD) */
      _exit(S.exitcode);
    }
    if (c == NULL && S.wantspare && forkspare())
      c = sparewait();
    if (c != NULL) {  /* an executor: back into the script */
      lua_createtable(L, c->r.nargv, 0);
      for (i = 0; i < c->r.nargv; i++) {
        lua_pushstring(L, c->r.argv[i]);
        lua_rawseti(L, -2, i + 1);
      }
      S.L = NULL;
      return 1;
    }
  }
}


/* core.interp_parseenv(s) -> {mtime = {sec, nsec}, fds = {...}} | nil, err
** (for the specs and the fuzzer) */
static int l_parseenv (lua_State *L) {
  pf_interp_env e;
  const char *err = pf_interp_parseenv(luaL_checkstring(L, 1), &e);
  int i;
  if (err != NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)e.mtime.tv_sec);
  lua_setfield(L, -2, "sec");
  lua_pushinteger(L, (lua_Integer)e.mtime.tv_nsec);
  lua_setfield(L, -2, "nsec");
  lua_createtable(L, 4, 0);
  for (i = 0; i < 4; i++) {
    lua_pushinteger(L, e.fd[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "fds");
  return 1;
}


/* core.interp_parsereq(s) -> env list, argv list | nil, err */
static int l_parsereq (lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  pf_interp_req r;
  const char *err;
  int i;
  char *buf = (char *)malloc(len + 1);
  if (buf == NULL) return luaL_error(L, "out of memory");
  memcpy(buf, s, len);
  err = pf_interp_parsereq(buf, len, &r);
  if (err != NULL) {
    free(buf);
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, r.nenv, 0);
  for (i = 0; i < r.nenv; i++) {
    lua_pushstring(L, r.env[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_createtable(L, r.nargv, 0);
  for (i = 0; i < r.nargv; i++) {
    lua_pushstring(L, r.argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  free(r.env);
  free(buf);
  return 2;
}


/* core.interp_sendfd(sock, fd) -> true | fail: one byte with one fd, raw
** (unframed), as the prefork-interp client sends fds 0, 1 and 2 */
static int l_sendfd (lua_State *L) {
  int sock = pf_tofd(L, 1), fd = pf_tofd(L, 2);
  if (!pf_sendfd(sock, fd)) return pf_fail(L, "sendmsg");
  lua_pushboolean(L, 1);
  return 1;
}


/* core.interp_greeting() -> the bytes the server greets with */
static int l_greeting (lua_State *L) {
  unsigned char g[PF_INTERP_GREETLEN];
  size_t n = pf_interp_greeting(g);
  lua_pushlstring(L, (const char *)g, n);
  return 1;
}


void pf_open_interp (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"interp_serve", l_serve},
    {"interp_parseenv", l_parseenv},
    {"interp_parsereq", l_parsereq},
    {"interp_greeting", l_greeting},
    {"interp_sendfd", l_sendfd},
    {"interp_sentinel", l_sentinel},
    {"interp_setexit", l_setexit},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, PF_INTERP_MAXREQ);
  lua_setfield(L, -2, "interp_maxreq");
}

/* }====================================================== */
