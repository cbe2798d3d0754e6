/*
** interp_exec.c: the executor side of the prefork-interp server. An
** executor is a child of the server that becomes one call's process (the
** caller's fds 0, 1 and 2, environment and argv, a process group of its
** own) and returns into the script. Here also: its quick end with an
** early status, and the spare executors, made ahead of calls by a spare
** maker, that wait for a call to become its executor. No libev, no
** logging: the server (interp_server.c) watches and reports.
*/

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "interp_state.h"


static pf_iexeccfg X;  /* the server's, for its executors */


void pf_iexec_setup (const pf_iexeccfg *cfg) {
  X = *cfg;
}


/* {======================================================
** Becoming the caller's process
** ======================================================= */

static int cmpint (const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}


/* close fds lo..hi one by one, as /proc lists them (no close_range) */
static void closeslow (int lo, int hi) {
  DIR *d = opendir("/proc/self/fd");
  int dfd = d != NULL ? dirfd(d) : -1;
  struct dirent *e;
  while (d != NULL && (e = readdir(d)) != NULL) {
    int fd = atoi(e->d_name);
    if (fd >= lo && fd <= hi && fd != dfd && e->d_name[0] != '.')
      close(fd);
  }
  if (d != NULL) closedir(d);
}


/* close every fd from 3 up, but the kept ones and also (if >= 0); no
** allocation for a few kept fds (an executor's every write to the heap
** it shares with the server is a page copied) */
void pf_iexec_closeabove (int also) {
  int few[16], i, lo = 3, n = X.nkeep;
  int *keep = n < 16 ? few : (int *)malloc(((size_t)n + 1) * sizeof(int));
  if (keep == NULL) _exit(127);
  if (n > 0) memcpy(keep, X.keep, (size_t)n * sizeof(int));
  if (also >= 0) keep[n++] = also;
  if (n > 1) qsort(keep, (size_t)n, sizeof(int), cmpint);
  for (i = 0; i <= n; i++) {
    int hi = i < n ? keep[i] - 1 : INT_MAX;
    if (hi >= lo && close_range((unsigned)lo, (unsigned)hi, 0) != 0)
      closeslow(lo, hi);
    if (i < n && keep[i] + 1 > lo) lo = keep[i] + 1;
  }
  if (keep != few) free(keep);
}


/* every signal to its default action (the server ignores SIGPIPE and
** catches others), none blocked; no syslog connection of the server's */
static void defaults (void) {
  struct sigaction sa;
  sigset_t none;
  int sig;
  if (X.syslog) closelog();
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  for (sig = 1; sig < NSIG; sig++)
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &sa, NULL);
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
}


static int inexec = 0;  /* this process is (about to be) an executor */
static FILE *luaerr;  /* stderr before quickend (io.stderr's FILE) */
static void quickend (void);
static void answerto (int fd);


/* the call's environment, in place in the request's array (which lives
** as long as the process): its entries, a later one of a name in place
** of an earlier one (as putenv would do), but PREFORK_INTERP; environ
** set once, not grown entry by entry */
static void callenv (pf_ijob *j) {
  char **env = j->r.env;
  int i, k, n = 0;
  for (i = 0; i < j->r.nenv; i++) {
    size_t len = (size_t)(strchr(env[i], '=') - env[i]) + 1;  /* "name=" */
    int drop = strncmp(env[i], "PREFORK_INTERP=", len) == 0;
    for (k = i + 1; k < j->r.nenv && !drop; k++)
      drop = strncmp(env[i], env[k], len) == 0;
    if (!drop) env[n++] = env[i];
  }
  env[n] = NULL;
  environ = env;
}


/* ps shows the call's argv; argv[0] stays this program's (lua.c's
** progname reads it) */
static void title (pf_ijob *j) {
  char *argv0 = j->r.argv[0];
  if (X.argv0 != NULL) j->r.argv[0] = (char *)(size_t)X.argv0;
  pf_settitlev((const char *const *)j->r.argv, j->r.nargv);
  j->r.argv[0] = argv0;
}


/* the caller's fds, environment and title; the server's death from now
** on is as if the caller were gone */
static void enter (pf_ijob *j) {
  int i;
  prctl(PR_SET_PDEATHSIG, SIGINT, 0, 0, 0);
  for (i = 0; i < 3; i++)
    if (dup2(j->fds[i], i) < 0) _exit(127);
  pf_iexec_closeabove(j->fds[PF_CALLFD] >= 3 ? j->fds[PF_CALLFD] : -1);
  answerto(j->fds[PF_CALLFD]);
  if (!inexec) quickend();
  __fpurge(stdin);
  clearerr(stdin);
  clearerr(stdout);
  clearerr(luaerr);
  callenv(j);
  title(j);
}


/* in a new child of the server (pf_fork): the executor of j, in a group
** of its own */
void pf_iexec_become (pf_ijob *j) {
  setpgid(0, 0);
  defaults();
  enter(j);
}

/* }====================================================== */


/* {======================================================
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
**
** An early status. An executor ends with a large address space, mostly
** shared with the server; the kernel's taking it apart (a millisecond
** for 20 MB) comes before the SIGCHLD. So an executor that exits (the
** end of the script, os.exit, an uncaught error) flushes its output,
** closes every fd, as its exit would, and sigqueues PF_SIGREPORT with
** its code to the server; the reaped status is then only checked. A
** death by a signal has no early status.
**
** The status goes to the client from the executor itself, on its copy of
** the call's connection (one wake-up less: a wake-up of a sleeping CPU is
** 0.2 ms on a VM): the report says so (PF_REPORTSENDS) before the status
** goes, so that the server stops watching the client (whose end of
** stream would mean "interrupt the call") before the client can end.
** The copy is checked to be the same socket still (a script may close
** fds and open others); without it the server answers. The server also
** sends the reaped status to a client still there (an answer that
** failed, or an executor killed between its report and its answer: the
** client reads the first status it gets). With the server gone, the
** executor still answers (its client would wait for its copy to close).
** ======================================================= */

static int errored = 0;  /* lua.c reported an error */
static int exitcode = -1;  /* os.exit(code, true) */
static struct {
  pid_t self;  /* the executor (not a child it forked) */
  int fd;  /* the call's connection, or -1 */
  dev_t dev;  /* its identity */
  ino_t ino;
} ans = {0, -1, 0, 0};


/* the executor answers its client on fd (if >= 3 and the server takes
** reports; else fd goes) */
static void answerto (int fd) {
  struct stat st;
  ans.self = getpid();
  ans.fd = -1;
  if (fd >= 3 && X.report && fstat(fd, &st) == 0) {
    ans.fd = fd;
    ans.dev = st.st_dev;
    ans.ino = st.st_ino;
  }
  else if (fd >= 3)
    close(fd);
}


/* the call's connection, if it is still ours: its fd, or -1 */
static int answerfd (void) {
  struct stat st;
  if (ans.fd < 0 || fstat(ans.fd, &st) != 0 || st.st_dev != ans.dev
      || st.st_ino != ans.ino)
    return -1;
  return ans.fd;
}


/* every fd closed but keep (or all, if keep < 0): 0 or -1 */
static int closeall (int keep) {
  if (keep < 0) return close_range(0, ~0U, 0);
  if (close_range(0, (unsigned)keep - 1, 0) != 0) return -1;
  return close_range((unsigned)keep + 1, ~0U, 0);
}


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


/* the early status (only from the executor itself, not from a child it
** forked): stdio flushed and every fd closed as by an exit, the code
** reported to the server, then the status to the client on the call's
** connection, when the executor still has it */
static void report (int code) {
  union sigval v;
  int fd, server;
  unsigned char b[4];
  fflush(NULL);
  if (!inexec || getpid() != ans.self) return;
  server = X.report && X.server > 0 && getppid() == X.server;
  if ((!server && ans.fd < 0) || closeall(fd = answerfd()) != 0)
    return;
  v.sival_int = (code & 0xff) | (fd >= 0 ? PF_REPORTSENDS : 0);
  if (server && sigqueue(X.server, PF_SIGREPORT, v) != 0)
    return;  /* the server answers once it reaps us */
  if (fd < 0) return;
  pf_status_encode(b, (code & 0xff) << 8);  /* W_EXITCODE(code, 0) */
  (void)!send(fd, b, sizeof(b), MSG_DONTWAIT | MSG_NOSIGNAL);
  close(fd);
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
int pf_iexec_sentinel (lua_State *L) {
  lua_newuserdatauv(L, 1, 0);
  if (luaL_newmetatable(L, "prefork.interp.sentinel")) {
    lua_pushcfunction(L, sentinel_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return 1;
}


/* core.interp_setexit(code): os.exit's code, for a closing os.exit */
int pf_iexec_setexit (lua_State *L) {
  if (lua_isboolean(L, 1))
    exitcode = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else
    exitcode = (int)luaL_optinteger(L, 1, EXIT_SUCCESS) & 0xff;
  return 0;
}


static void quickend (void) {
  static const cookie_io_functions_t io = {NULL, errwrite, NULL, NULL};
  FILE *f = fopencookie(NULL, "w", io);
  luaerr = stderr;
  inexec = 1;
  on_exit(onexit, NULL);
  if (f != NULL) {
    setvbuf(f, NULL, _IONBF, 0);
    stderr = f;
  }
}

/* }====================================================== */


/* {======================================================
** Spares. Forking the server is the dearest step of a call (the page
** tables of its heap are copied: from 0.3 ms to several for 30 MB), so
** executors are forked ahead. They come from a spare maker, a child of
** the server made once, as soon as the script is initialised: it forks a
** spare whenever the server asks (a byte on their channel), as a child
** of the server itself (CLONE_PARENT: the server reaps it and has its
** status), so that no fork ever holds up the server's loop. The maker
** sends each spare's pid back, with the server's end of a channel to
** the spare. A spare does the half of becoming an executor that needs
** no call, then waits; a call comes whole in one message: a u32 length
** (host order) and the request, with the caller's three fds and the
** call's connection (the executor answers on it). The spare
** answers "A" once it has it all. Spares and maker die with the server.
** ======================================================= */

/* a message with the call's three fds and its connection, the u32 and
** the request in it */
static void handoffmsg (struct msghdr *m, struct iovec *iov, void *ctl,
                        size_t ctllen) {
  memset(m, 0, sizeof(*m));
  memset(ctl, 0, ctllen);
  m->msg_iov = iov;
  m->msg_iovlen = 2;
  m->msg_control = ctl;
  m->msg_controllen = ctllen;
}


/* the server's half: the call j to the spare at chan, never blocking;
** 1 when it went whole */
int pf_iexec_handoff (int chan, const pf_ijob *j) {
  union { char buf[CMSG_SPACE(sizeof(j->fds))]; struct cmsghdr a; } ctl;
  uint32_t len = (uint32_t)j->len;
  struct iovec iov[2];
  struct msghdr m;
  struct cmsghdr *cm;
  iov[0].iov_base = &len;
  iov[0].iov_len = sizeof(len);
  iov[1].iov_base = j->req;
  iov[1].iov_len = j->len;
  handoffmsg(&m, iov, ctl.buf, sizeof(ctl.buf));
  cm = CMSG_FIRSTHDR(&m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(j->fds));
  memcpy(CMSG_DATA(cm), j->fds, sizeof(j->fds));
  return sendmsg(chan, &m, MSG_DONTWAIT | MSG_NOSIGNAL)
         == (ssize_t)(sizeof(len) + j->len);
}


/* the spare's half: the length and the four fds; 0 when the server
** closed the channel */
static int takehead (int chan, pf_ijob *j, uint32_t *len) {
  union { char buf[CMSG_SPACE(sizeof(j->fds))]; struct cmsghdr a; } ctl;
  struct iovec iov[2];
  struct msghdr m;
  struct cmsghdr *cm;
  ssize_t n;
  iov[0].iov_base = len;
  iov[0].iov_len = sizeof(*len);
  handoffmsg(&m, iov, ctl.buf, sizeof(ctl.buf));
  m.msg_iovlen = 1;
  do n = recvmsg(chan, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n == 0) _exit(0);  /* the server is gone, or dropped us */
  cm = CMSG_FIRSTHDR(&m);
  if (n != (ssize_t)sizeof(*len) || cm == NULL
      || cm->cmsg_len != CMSG_LEN(sizeof(j->fds)))
    return 0;
  memcpy(j->fds, CMSG_DATA(cm), sizeof(j->fds));
  j->nfds = 3;
  return 1;
}


/* the rest of the call: its request, parsed; then the answer "A" */
static int takecall (int chan, pf_ijob *j) {
  uint32_t len;
  size_t got = 0;
  if (!takehead(chan, j, &len) || len > PF_MAXREQ
      || (j->req = (char *)malloc((size_t)len + 1)) == NULL)
    return 0;
  j->len = len;
  while (got < j->len) {
    ssize_t n = recv(chan, j->req + got, j->len - got, MSG_WAITALL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return 0;
    got += (size_t)n;
  }
  return pf_req_parse(j->req, j->len, &j->r) == NULL
         && send(chan, "A", 1, MSG_NOSIGNAL) == 1;
}


/* in a new spare (from pf_iexec_maker): wait for a call, then become its
** executor; signals act at once meanwhile (most kill the spare, not the
** call it would take next) */
void pf_iexec_spare (int chan, pf_ijob *j) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (getppid() != X.server) _exit(127);
  if (X.sparetitle != NULL) pf_settitle(X.sparetitle);
  prctl(PR_SET_NAME, "spare executor", 0, 0, 0);  /* (ps -o comm) */
  quickend();  /* ahead: it needs no call */
  if (!takecall(chan, j)) _exit(127);
  close(chan);
  enter(j);
}


/* fork a spare as a child of the server: its end of its channel in the
** spare; in the maker -1, once the spare's pid and the server's end of
** the channel went to the server (or -errno, with no fd) */
static int makespare (int chan) {
  int sv[2] = {-1, -1};
  int32_t msg;
  pid_t pid = -1;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0) {
    pid = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) {
      close(chan);
      close(sv[0]);
      return sv[1];
    }
  }
  msg = pid > 0 ? (int32_t)pid : -(int32_t)errno;
  (void)pf_sendfdmsg(chan, pid > 0 ? sv[0] : -1, &msg, sizeof(msg), 0);
  if (sv[0] >= 0) { close(sv[0]); close(sv[1]); }
  return -1;
}


/*
** The spare maker: in a new child of the server (pf_fork), with chan its
** end of their channel. It touches none of the heap it shares with the
** server and its spares (a lean process: each fork copies page tables
** only), dies with the server and leaves when the channel closes.
** Returns only in a new spare: its channel.
*/
int pf_iexec_maker (int chan) {
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (getppid() != X.server) _exit(0);
  defaults();
  pf_iexec_closeabove(chan);
  if (X.makertitle != NULL) pf_settitle(X.makertitle);
  prctl(PR_SET_NAME, "spare maker", 0, 0, 0);
  for (;;) {
    char b;
    ssize_t n = read(chan, &b, 1);
    if (n == 0 || (n < 0 && errno != EINTR)) _exit(0);
    if (n == 1 && (n = makespare(chan)) >= 0) return (int)n;
  }
}

/* }====================================================== */
