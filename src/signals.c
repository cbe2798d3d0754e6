/*
** signals.c: the signals a running master takes. Each one it handles
** reaches the master's handler (m->onsignal) on its loop, with how many
** came: TTIN and TTOU are counted (two quick ones are two, where a
** flag would merge them), the others are not. PIPE is ignored: a write
** to a closed pipe fails with EPIPE instead. What the signals did before
** comes back when the master stops; a new child starts from the same
** (an ignored one stays ignored, as across exec).
*/

#include <signal.h>
#include <string.h>

#include "state.h"


/* the signals that reach the handler as they come (in m->sig[]) */
static const int plain[] = {
  SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM,
  SIGVTALRM, SIGPROF, SIGIO, SIGURG
};
#define NPLAIN	((int)(sizeof(plain) / sizeof(plain[0])))

/* the counted ones, and PIPE (saved after the plain ones) */
static const int counted[] = {SIGTTIN, SIGTTOU};
#define NCOUNTED	((int)(sizeof(counted) / sizeof(counted[0])))
#define PIPESLOT	(NPLAIN + NCOUNTED)

static volatile sig_atomic_t ncame[NCOUNTED];  /* not yet handled */
static master *running = NULL;  /* whose loop the counted ones wake */


static void onplain (struct ev_loop *loop, ev_signal *s, int revents) {
  master *m = (master *)s->data;
  (void)loop; (void)revents;
  m->onsignal(m, s->signum, 1);
}


/* a counted signal's handler (not libev's, which has a flag per signal) */
static void count (int sig) {
  int i;
  for (i = 0; i < NCOUNTED; i++)
    if (counted[i] == sig) ncame[i]++;
  if (running != NULL) ev_async_send(EV_DEFAULT, &running->counted);
}


static void oncounted (struct ev_loop *loop, ev_async *a, int revents) {
  master *m = (master *)a->data;
  int i;
  (void)loop; (void)revents;
  for (i = 0; i < NCOUNTED; i++) {
    int n = __atomic_exchange_n(&ncame[i], 0, __ATOMIC_SEQ_CST);
    if (n > 0 && running == m) m->onsignal(m, counted[i], n);
  }
}


/* catch the counted ones with our own handler; ignore PIPE */
static void setcounted (master *m) {
  struct sigaction sa;
  int i;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = count;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (i = 0; i < NCOUNTED; i++) {
    ncame[i] = 0;
    sigaction(counted[i], &sa, &m->saved[NPLAIN + i]);
  }
  sa.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &sa, &m->saved[PIPESLOT]);
}


/* the master's loop takes the signals, for m->onsignal */
void pf_signals_start (master *m) {
  int i;
  for (i = 0; i < NPLAIN; i++) {
    sigaction(plain[i], NULL, &m->saved[i]);
    ev_signal_init(&m->sig[i], onplain, plain[i]);
    m->sig[i].data = m;
    ev_signal_start(EV_DEFAULT, &m->sig[i]);
  }
  ev_async_init(&m->counted, oncounted);
  m->counted.data = m;
  ev_async_start(EV_DEFAULT, &m->counted);
  running = m;
  setcounted(m);
}


/* the signals do what they did before */
void pf_signals_stop (master *m) {
  int i;
  for (i = 0; i < NPLAIN; i++) {
    ev_signal_stop(EV_DEFAULT, &m->sig[i]);
    sigaction(plain[i], &m->saved[i], NULL);
  }
  for (i = 0; i < NCOUNTED; i++)
    sigaction(counted[i], &m->saved[NPLAIN + i], NULL);
  sigaction(SIGPIPE, &m->saved[PIPESLOT], NULL);
  ev_async_stop(EV_DEFAULT, &m->counted);
  running = NULL;
}


/* in a new child: the master's watchers go (libev keeps them in
** process-wide tables); a signal ignored before the master ran stays
** ignored (nohup); the others get their default back in the child's
** reset (proc.c); PIPE is as it was before the master ran (a worker's
** connections write with MSG_NOSIGNAL) */
void pf_signals_forget (master *m) {
  int i;
  for (i = 0; i < NPLAIN; i++) {
    ev_signal_stop(EV_DEFAULT, &m->sig[i]);
    if (m->saved[i].sa_handler == SIG_IGN)
      sigaction(plain[i], &m->saved[i], NULL);
  }
  for (i = 0; i < NCOUNTED; i++)
    if (m->saved[NPLAIN + i].sa_handler == SIG_IGN)
      sigaction(counted[i], &m->saved[NPLAIN + i], NULL);
  sigaction(SIGPIPE, &m->saved[PIPESLOT], NULL);
  ev_async_stop(EV_DEFAULT, &m->counted);
  running = NULL;
}
