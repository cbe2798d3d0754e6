/*
** interp_call.c: one call's connection on the server's side, from its
** greeting to its status: the request read step by step as it arrives
** (never blocking), the signal bytes the client sends after it, the
** status. No libev and no logging: the server (interp_server.c) calls
** these from its watchers and says what happened.
*/

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include "interp_state.h"


/* the greeting: 1 sent, 0 the client is gone already, -1 errno */
int pf_icall_greet (pf_icall *c) {
  unsigned char g[PF_GREETLEN];
  size_t n = pf_greet_encode(g);
  c->state = PF_CSIGBYTE;
  c->early = -1;
  c->byexec = 0;
  c->job.fds[PF_CALLFD] = -1;
  if (send(c->fd, g, n, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)n) return 1;
  return errno == EPIPE || errno == ECONNRESET ? 0 : -1;
}


/* {======================================================
** The request, step by step
** ======================================================= */

/* a bad call: why (and errno, or 0) */
static int bad (const char **why, int *en, const char *what, int e) {
  *why = what;
  *en = e;
  return PF_CALL_BAD;
}


/* the signalling byte, or one of the three fds: a message of one byte */
static int takebyte (pf_icall *c, const char **why, int *en) {
  unsigned char b;
  int fd;
  ssize_t n = pf_recvfdmsg(c->fd, &fd, &b, 1, MSG_DONTWAIT, NULL);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return PF_CALL_MORE;
  if (n < 0) return bad(why, en, "recvmsg", errno);
  if (n == 0) return PF_CALL_LEFT;
  if (c->state == PF_CSIGBYTE) {
    if (fd >= 0) close(fd);
    if (b != PF_SIGBYTE) return bad(why, en, "bad signalling byte", 0);
    c->state = PF_CFDS;
  }
  else {
    if (fd < 0) return bad(why, en, "a message without an fd", 0);
    c->job.fds[c->job.nfds++] = fd;
    if (c->job.nfds == 3) { c->state = PF_CLEN; c->got = 0; }
  }
  return -1;  /* go on */
}


/* the length or the request, complete: the next state */
static int complete (pf_icall *c, const char **why, int *en) {
  const char *err;
  if (c->state == PF_CLEN) {
    if ((err = pf_req_len(c->lenb, &c->job.len)) != NULL)
      return bad(why, en, err, 0);
    if ((c->job.req = (char *)malloc(c->job.len + 1)) == NULL)
      return bad(why, en, "not enough memory", 0);
    c->state = PF_CBODY;
    c->got = 0;
    if (c->job.len > 0) return -1;
  }
  if ((err = pf_req_parse(c->job.req, c->job.len, &c->job.r)) != NULL)
    return bad(why, en, err, 0);
  c->state = PF_CREADY;
  c->job.fds[PF_CALLFD] = c->fd;
  return PF_CALL_DONE;
}


/* bytes of the length or of the request */
static int takebytes (pf_icall *c, const char **why, int *en) {
  int body = c->state == PF_CBODY;
  char *dst = body ? c->job.req + c->got : (char *)c->lenb + c->got;
  size_t want = (body ? c->job.len : 4) - c->got;
  ssize_t n = recv(c->fd, dst, want, MSG_DONTWAIT);
  if (n < 0 && errno == EINTR) return -1;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return PF_CALL_MORE;
  if (n < 0) return bad(why, en, "recv", errno);
  if (n == 0) return bad(why, en, "end of stream in the request", 0);
  c->got += (size_t)n;
  return c->got == (body ? c->job.len : 4) ? complete(c, why, en) : -1;
}


/* read what has come of the request: PF_CALL_* */
int pf_icall_read (pf_icall *c, const char **why, int *en) {
  int r;
  do {
    if (c->state == PF_CSIGBYTE || c->state == PF_CFDS)
      r = takebyte(c, why, en);
    else if (c->state == PF_CLEN || c->state == PF_CBODY)
      r = takebytes(c, why, en);
    else
      r = PF_CALL_MORE;
  } while (r < 0);
  return r;
}

/* }====================================================== */


/* {======================================================
** While the executor runs, and after
** ======================================================= */

/* the signals a client may forward */
static int forwardable (int sig) {
  return sig == SIGINT || sig == SIGTERM || sig == SIGHUP || sig == SIGQUIT
      || sig == SIGUSR1 || sig == SIGUSR2 || sig == SIGWINCH;
}


/* the bytes after the request: signals for the executor's group (*ignored:
** the last byte that is none, or -1). An EOF means the client is gone: 0
** (the caller interrupts the call: pf_icall_interrupt); else 1 */
int pf_icall_signals (pf_icall *c, int *ignored) {
  unsigned char buf[64];
  *ignored = -1;
  for (;;) {
    ssize_t i, n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 1;
    if (n <= 0) {  /* EOF or a reset: the client went away */
      c->state = PF_CGONE;
      return 0;
    }
    for (i = 0; i < n; i++) {
      if (!forwardable(buf[i])) *ignored = buf[i];
      else if (c->pid > 0) kill(-c->pid, buf[i]);
    }
  }
}


/* the client went away: SIGINT to the executor's group, unless the
** executor is answering it (its client's end is no interruption then) */
void pf_icall_interrupt (pf_icall *c) {
  if (c->pid > 0 && !c->byexec) kill(-c->pid, SIGINT);
}


/* the status to the client, unless it is gone (what it sent before is
** read first: an EOF); no more bytes from it after this */
void pf_icall_answer (pf_icall *c, int status) {
  int ignored;
  if (c->state != PF_CRUN) return;
  if (pf_icall_signals(c, &ignored)) {
    unsigned char b[4];
    pf_status_encode(b, status);
    (void)!send(c->fd, b, sizeof(b), MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  else
    pf_icall_interrupt(c);
  c->state = PF_CGONE;
}


/* the executor sends status to the client itself (its report said so):
** the client's end is no interruption now (the server stops watching
** it, and answers too once it reaps the executor, if the client is still
** there) */
void pf_icall_answered (pf_icall *c, int status) {
  c->early = status;
  c->byexec = 1;
}


/* the connection and whatever came with it, closed and freed */
void pf_icall_close (pf_icall *c) {
  int i;
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  for (i = 0; i < c->job.nfds; i++) close(c->job.fds[i]);
  c->job.nfds = 0;
  free(c->job.r.env);
  free(c->job.req);
  c->job.r.env = NULL;
  c->job.req = NULL;
}

/* }====================================================== */
