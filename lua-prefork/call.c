/*
** call.c: one call, from the client's side (the wire is in src/wire.c).
** Before anything of ours goes out, the server's credentials are checked
** (SO_PEERCRED): a socket that another user's server answers on, through
** a symlink say, gets neither our fds nor our environment. The request
** then goes at once, without waiting for the greeting: the server reads
** it once it has greeted, so the wire is the same, and a round trip and
** the server's wake-ups in between are saved. The signalling byte, the
** three fds and the request go in one sendmmsg; the request rides with
** fd 2's byte.
*/

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>

#include "client.h"


/* {======================================================
** Connecting, the request, the greeting
** ======================================================= */

static int catch_signals (void);
static int sigpipe_r = -1;  /* the signals caught, to forward */

/* the server must run as we do, or as root */
static void check_server (int fd) {
  struct ucred cr;
  socklen_t len = sizeof(cr);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0)
    diee("SO_PEERCRED on %s", cl.socket_path);
  if (cr.uid != getuid() && cr.uid != 0)
    die("the server on %s runs as uid %lu, not as uid %lu or root:"
        " refused (nothing was sent to it)", cl.socket_path,
        (unsigned long)cr.uid, (unsigned long)getuid());
}


/* what a partly sent message has left (after sent bytes) */
static void send_rest (int sock, const struct msghdr *m, size_t sent) {
  size_t i;
  for (i = 0; i < m->msg_iovlen; i++) {
    const char *p = (const char *)m->msg_iov[i].iov_base;
    size_t n = m->msg_iov[i].iov_len, skip = sent < n ? sent : n;
    sent -= skip;
    for (p += skip, n -= skip; n > 0; ) {
      ssize_t r = send(sock, p, n, MSG_NOSIGNAL);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) diee("write request");
      p += r;
      n -= (size_t)r;
    }
  }
}


static size_t msg_size (const struct msghdr *m) {
  size_t i, n = 0;
  for (i = 0; i < m->msg_iovlen; i++) n += m->msg_iov[i].iov_len;
  return n;
}


/* all n messages; 0 when the server is gone already (a stale one) */
static int send_all (int sock, struct mmsghdr *mm, unsigned n) {
  unsigned i = 0;
  while (i < n) {
    int r = sendmmsg(sock, mm + i, n - i, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EPIPE || errno == ECONNRESET)) return 0;
    if (r < 0) diee("write request");
    for (; r > 0; r--, i++)
      if (mm[i].msg_len < msg_size(&mm[i].msg_hdr))
        send_rest(sock, &mm[i].msg_hdr, mm[i].msg_len);
  }
  return 1;
}


/* signalling byte, fds 0 1 2, then length and request; 0 when the server
** is gone already */
static int send_request (int sock) {
  struct mmsghdr mm[4];
  struct iovec iov[5];
  pf_fdctl ctl[3];
  unsigned char bytes[4] = {PF_SIGBYTE, 0, 0, 0}, *req;
  size_t len = pf_req_size(environ, cl.exec_argv);
  int i, ok;
  if (len > UINT32_MAX - 4) die("cannot handle data with length >2^32");
  if (sigpipe_r < 0) sigpipe_r = catch_signals();  /* (from the request on) */
  req = (unsigned char *)xmalloc(len + 4);
  pf_req_encode(req, environ, cl.exec_argv, len);
  memset(mm, 0, sizeof(mm));
  iov[0].iov_base = bytes;
  iov[0].iov_len = 1;
  mm[0].msg_hdr.msg_iov = iov;
  mm[0].msg_hdr.msg_iovlen = 1;
  for (i = 0; i < 3; i++)
    pf_fdmsg_build(&mm[i + 1].msg_hdr, &iov[i + 1], &ctl[i], &bytes[i + 1], i);
  iov[4].iov_base = req;  /* after fd 2's byte, in the same message */
  iov[4].iov_len = len + 4;
  mm[3].msg_hdr.msg_iovlen = 2;
  ok = send_all(sock, mm, 4);
  free(req);
  return ok;
}


/* the request on a call socket the server has (spawn.c) */
void call_send (int sock) {
  if (!send_request(sock)) die("monitor process quit unexpectedly");
}


/* the greeting; 0 when the peer went away before the magic (stale), a
** broken greeting after that is fatal */
int call_greeting (int fd) {
  static unsigned char buf[8 + PF_MAXXLEN];
  size_t have = 0, want = 8;
  int st = PF_GREET_MORE;
  do {
    ssize_t r = read(fd, buf + have, want - have);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != ECONNRESET)
      diee("read() on monitor call socket (greeting)");
    if (r <= 0) {  /* EOF */
      if (have < 4) return 0;
      die("monitor process quit unexpectedly (in the greeting)");
    }
    have += (size_t)r;
    st = pf_greet_parse(buf, have, &want);
    if (st == PF_GREET_BADMAGIC)
      die("got unexpected protocol magic 0x%02x%02x%02x%02x",
          buf[0], have > 1 ? buf[1] : 0, have > 2 ? buf[2] : 0,
          have > 3 ? buf[3] : 0);
    if (st == PF_GREET_TOOBIG)
      die("greeting extra data of %lu bytes is over the limit of %d",
          (unsigned long)pf_get32(buf + 4), PF_MAXXLEN);
  } while (st != PF_GREET_OK);
  return 1;
}


/* a call socket to the running server, the request sent and the
** greeting read; -1 when there is no server or a stale one (gone before
** its greeting: a request it did not take is no error) */
int call_connect (void) {
  int fd, sent;
  if (cl.mode != 0) return -1;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) diee("socket() for client");
  if (connect(fd, (const struct sockaddr *)&cl.addr, sizeof(cl.addr)) != 0) {
    if (errno == ECONNREFUSED || errno == ENOENT) { close(fd); return -1; }
    diee("connect() %s", cl.socket_path);
  }
  check_server(fd);
  sent = send_request(fd);
  if (!call_greeting(fd)) {
    close(fd);
    return -1;
  }
  if (!sent) die("monitor process quit unexpectedly");
  return fd;
}

/* }====================================================== */


/* {======================================================
** Waiting for the status, forwarding signals
** ======================================================= */

static const int fwd_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT,
                                  SIGUSR1, SIGUSR2, SIGWINCH};
static int sigpipe_w = -1;


static void on_signal (int sig) {
  int e = errno;
  unsigned char b = (unsigned char)sig;
  if (write(sigpipe_w, &b, 1) < 0) { /* full: the signal is dropped */ }
  errno = e;
}


/* forward those the caller did not leave ignored: caught from the moment
** the request goes (the executor may run before the greeting is read) */
static int catch_signals (void) {
  int p[2];
  size_t i;
  struct sigaction sa, old;
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) diee("pipe() for signals");
  sigpipe_w = p[1];
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (i = 0; i < sizeof(fwd_signals) / sizeof(fwd_signals[0]); i++) {
    if (sigaction(fwd_signals[i], NULL, &old) != 0) diee("sigaction");
    if (old.sa_handler != SIG_IGN && sigaction(fwd_signals[i], &sa, NULL) != 0)
      diee("sigaction");
  }
  return p[0];
}


static void forward (int sock, int sigr) {
  unsigned char b[64];
  ssize_t n, i;
  while ((n = read(sigr, b, sizeof(b))) > 0)
    for (i = 0; i < n; i++)  /* a gone or stuffed peer is not fatal */
      if (send(sock, &b[i], 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 &&
          errno != EPIPE && errno != ECONNRESET && errno != EAGAIN &&
          errno != EINTR)
        diee("forward signal %d", b[i]);
}


/* the call's status, signals forwarded meanwhile */
int call_status (int sock) {
  unsigned char st[4];
  size_t have = 0;
  struct pollfd p[2];
  int status;
  p[0].fd = sock; p[0].events = POLLIN;
  p[1].fd = sigpipe_r; p[1].events = POLLIN;
  while (have < 4) {
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      diee("poll");
    }
    if (p[1].revents) forward(sock, p[1].fd);
    if (p[0].revents) {
      ssize_t r = read(sock, st + have, 4 - have);
      if (r > 0) have += (size_t)r;
      else if (r == 0 || errno == ECONNRESET)
        die("monitor process quit unexpectedly");
      else if (errno != EINTR && errno != EAGAIN)
        diee("read() on monitor call socket (status)");
    }
  }
  if (!pf_status_decode(st, &status))
    die("status 0x%lx does not fit in an int", (unsigned long)pf_get32(st));
  return status;
}


/* exit as the call did: its code, or death by its signal (with core
** dumps of our own off); a signal that does not kill: 128 + N */
void propagate (int status, const char *what) {
  if (WIFEXITED(status)) exit(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    struct rlimit nocore = {0, 0};
    struct sigaction sa;
    sigset_t set;
    fflush(NULL);
    setrlimit(RLIMIT_CORE, &nocore);  /* the core is the executor's */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigemptyset(&set);
    sigaddset(&set, sig);
    if (sig != SIGKILL && sig != SIGSTOP) {
      if (sigaction(sig, &sa, NULL) != 0)
        diee("failed to reset signal %d while propagating it", sig);
      sigprocmask(SIG_UNBLOCK, &set, NULL);
    }
    raise(sig);
    _exit(128 + sig);  /* a signal that does not kill */
  }
  die("%s failed with weird wait status %d 0x%x", what, status, status);
}

/* }====================================================== */
