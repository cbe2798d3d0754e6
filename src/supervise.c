/*
** supervise.c: the master's watch over its workers' heartbeats.
**
** Each worker has a watchdog: a timerfd that the master makes before the
** fork and watches, and that both sides arm (score.c says how the worker
** does). The master arms it at the fork for boot_timeout; the worker
** arms it for timeout when it leaves an idle wait. When it expires the
** master reads the worker's slot:
**
**   booting (not ready yet)   past boot_timeout since the fork: hung
**   idle                      disarmed: no more wake-ups while idle
**   busy, a recent beat       armed again for the rest of timeout
**   busy, no beat for timeout hung
**
** A hung worker gets PF_SIGTIMEOUT: it logs its Lua traceback and exits
** (worker.c). A second later, if it is still there (stuck in C or in a
** system call, where no hook runs), its process group gets KILL.
*/

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/timerfd.h>

#include "state.h"


/* the worker's process group: it leads one (spawn.c) */
void pf_killgroup (worker *w) {
  if (w->pid > 0 && kill(-w->pid, SIGKILL) != 0)
    kill(w->pid, SIGKILL);  /* (not a group leader yet) */
}


/* bytes of pid's resident memory, or -1 */
double pf_rss (pid_t pid) {
  char path[64];
  unsigned long size, rss;
  FILE *f;
  int n;
  snprintf(path, sizeof(path), "/proc/%ld/statm", (long)pid);
  if ((f = fopen(path, "re")) == NULL) return -1;
  n = fscanf(f, "%lu %lu", &size, &rss);
  fclose(f);
  return n == 2 ? (double)rss * (double)sysconf(_SC_PAGESIZE) : -1;
}


/* where pid waits in the kernel ("do_wait", ...), into buf */
static const char *wchan (pid_t pid, char *buf, size_t size) {
  char path[64];
  FILE *f;
  size_t n = 0;
  snprintf(path, sizeof(path), "/proc/%ld/wchan", (long)pid);
  if ((f = fopen(path, "re")) != NULL) {
    n = fread(buf, 1, size - 1, f);
    fclose(f);
  }
  buf[n] = '\0';
  if (n == 0 || strcmp(buf, "0") == 0) snprintf(buf, size, "running");
  return buf;
}


/* {======================================================
** Hung workers
** ======================================================= */

/* w did not beat for age seconds: it is asked for its traceback, and
** KILLed a second later if it is still there */
static void hung (master *m, worker *w, double age) {
  pf_score *s = &m->score[w->slot];
  w->hung = 1;
  m->timeouts++;
  __atomic_store_n(&s->hung, (long)(age * 1000), __ATOMIC_RELAXED);
  ev_io_stop(EV_DEFAULT, &w->watch);
  ev_timer_set(&w->fallback, 1.0, 0);
  ev_timer_start(EV_DEFAULT, &w->fallback);
  kill(w->pid, PF_SIGTIMEOUT);
  pf_log(m->L, "error", "worker %s (pid %ld) %s after %.3gs without a heartbeat: %s", w->name,
         (long)w->pid, w->state == W_STARTING ? "not ready" : "timed out",
         age, "it logs where it is, or is KILLed in 1s");
}


static void onfallback (struct ev_loop *loop, ev_timer *t, int revents) {
  worker *w = (worker *)t->data;
  char where[64];
  (void)loop; (void)revents;
  if (w->pid <= 0) return;
  pf_log(w->m->L, "error", "worker %s (pid %ld) still there 1s after its "
         "timeout, stuck outside Lua (%s): KILL", w->name, (long)w->pid,
         wchan(w->pid, where, sizeof(where)));
  pf_killgroup(w);
}


/* the watchdog of a booting worker: hung past boot_timeout */
static void booting (master *m, worker *w) {
  double age = pf_now() - w->started;
  if (age >= m->boottimeout) hung(m, w, age);
  else pf_score_arm(w->tfd, m->boottimeout - age);
}


/* the watchdog of a running worker */
static void running (master *m, worker *w) {
  pf_score *s = &m->score[w->slot];
  double age;
  if (m->timeout <= 0 || !__atomic_load_n(&s->busy, __ATOMIC_SEQ_CST)) {
    if (pf_score_disarm(s) || m->timeout <= 0) return;  /* idle */
  }
  age = pf_coarse() - pf_score_beat(s);
  if (age >= m->timeout) hung(m, w, age);
  else pf_score_arm(w->tfd, m->timeout - age);
}


static void onwatchdog (struct ev_loop *loop, ev_io *io, int revents) {
  worker *w = (worker *)io->data;
  unsigned long long n;
  (void)loop; (void)revents;
  if (read(w->tfd, &n, sizeof(n)) != (ssize_t)sizeof(n)) return;
  if (w->slot < 0 || w->hung) return;
  if (w->state == W_STARTING) booting(w->m, w);
  else if (w->state == W_RUNNING) running(w->m, w);
}

/* }====================================================== */


/* {======================================================
** The watchdog's life
** ======================================================= */

/* before a fork: the new worker's watchdog into *fd (the worker
** inherits it); 0 when it cannot be made */
int pf_watch_prepare (int *fd) {
  *fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  return *fd >= 0;
}


/* after w's fork, in the master: watch it, armed for the boot */
void pf_watch_start (master *m, worker *w) {
  w->hung = 0;
  ev_io_init(&w->watch, onwatchdog, w->tfd, EV_READ);
  ev_init(&w->fallback, onfallback);
  w->watch.data = w->fallback.data = w;
  ev_io_start(EV_DEFAULT, &w->watch);
  if (m->boottimeout > 0) {
    m->score[w->slot].armed = 1;
    pf_score_arm(w->tfd, m->boottimeout);
  }
}


/* w is ready: its watchdog, armed for the boot, now counts timeout (it
** is armed anyway: the next expiry finds the worker idle or busy) */
void pf_watch_ready (master *m, worker *w) {
  pf_score *s = &m->score[w->slot];
  if (m->timeout > 0) {
    __atomic_store_n(&s->armed, 1, __ATOMIC_SEQ_CST);
    pf_score_arm(w->tfd, m->timeout);
  }
  else if (m->boottimeout > 0)
    pf_score_arm(w->tfd, 0);
}


/* w stops: a stopping worker has graceful_timeout, not timeout (a KILL
** that a timeout began stays due) */
void pf_watch_pause (worker *w) {
  ev_io_stop(EV_DEFAULT, &w->watch);
}


/* w's process is gone: its watchdog goes */
void pf_watch_stop (worker *w) {
  ev_io_stop(EV_DEFAULT, &w->watch);
  ev_timer_stop(EV_DEFAULT, &w->fallback);
  if (w->tfd >= 0) close(w->tfd);
  w->tfd = -1;
}

/* }====================================================== */
