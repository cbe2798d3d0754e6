/*
** upgrade.c: the old master's side of an upgrade (USR2). The front has
** started the new master (the same command line, executed again, with
** the listening sockets passed by fd); this watches it: it says it is
** ready (its workers are) with a byte on a pipe; it may exit, or take
** longer than upgrade_timeout, instead. The outcome goes to the front's
** on_upgrade(ok, why), which stops the old master or rolls back.
*/

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "state.h"


/* the outcome: the watchers stop, then (last) the front hears it */
static void outcome (master *m, int ok, const char *why) {
  lua_State *L = m->L;
  ev_io_stop(EV_DEFAULT, &m->upio);
  ev_timer_stop(EV_DEFAULT, &m->uptimer);
  if (m->upfd >= 0) close(m->upfd);
  m->upfd = -1;
  if (ok) m->uppid = 0;  /* (its exit, later, is no news) */
  if (pf_pushcb(L, m, "on_upgrade")) {
    lua_pushboolean(L, ok);
    lua_pushstring(L, why);
    pf_callhook(L, "on_upgrade", 2);
  }
}


static void onupready (struct ev_loop *loop, ev_io *io, int revents) {
  master *m = (master *)io->data;
  char c;
  ssize_t n = read(io->fd, &c, 1);
  (void)loop; (void)revents;
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n == 1) outcome(m, 1, "its workers are ready");
  else {  /* it closed the pipe unready: it dies; its exit tells why */
    ev_io_stop(EV_DEFAULT, io);
  }
}


static void onuptimeout (struct ev_loop *loop, ev_timer *t, int revents) {
  master *m = (master *)t->data;
  char why[64];
  (void)loop; (void)revents;
  snprintf(why, sizeof(why), "not ready after %.3gs (upgrade_timeout)",
           m->uptimeout);
  outcome(m, 0, why);
}


/* watch the new master pid, which says it is ready on fd, for timeout
** seconds */
void pf_upgrade_watch (master *m, pid_t pid, int fd, double timeout) {
  m->uppid = pid;
  m->upfd = fd;
  m->uptimeout = timeout;
  ev_io_init(&m->upio, onupready, fd, EV_READ);
  ev_timer_init(&m->uptimer, onuptimeout, timeout, 0);
  m->upio.data = m->uptimer.data = m;
  ev_io_start(EV_DEFAULT, &m->upio);
  ev_timer_start(EV_DEFAULT, &m->uptimer);
}


/* a child exited: 1 when it was the new master (an upgrade that failed,
** unless it had said ready) */
int pf_upgrade_reaped (master *m, pid_t pid, int status) {
  char why[64];
  if (m->uppid <= 0 || pid != m->uppid) return 0;
  m->uppid = 0;
  if (m->upfd < 0) return 1;  /* the outcome is known */
  if (WIFSIGNALED(status))
    snprintf(why, sizeof(why), "it was killed by signal %s",
             pf_signame(WTERMSIG(status)) ? pf_signame(WTERMSIG(status)) : "?");
  else
    snprintf(why, sizeof(why), "it exited (%d) before it was ready",
             WEXITSTATUS(status));
  outcome(m, 0, why);
  return 1;
}


/* in a new child, or at the end: nothing of it */
void pf_upgrade_forget (master *m) {
  ev_io_stop(EV_DEFAULT, &m->upio);
  ev_timer_stop(EV_DEFAULT, &m->uptimer);
  if (m->upfd >= 0) close(m->upfd);
  m->upfd = -1;
  m->uppid = 0;
}
