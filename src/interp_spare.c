/*
** interp_spare.c: the server's side of its spare executors. Forking the
** server is the dearest step of a call (the page tables of its heap are
** copied: from 0.3 ms to several for 30 MB), and so is an executor's
** exit; neither should hold up a call. So executors are forked ahead, by
** the spare maker (interp_exec.c), a child made once the script is
** initialised, and the server hands each complete request to a ready
** spare. Two spares are kept ready, three once a call found none. The
** spare that takes a call is replaced once that call is over (its
** executor reaped), not while it runs or while its client takes its
** status: on two cores the fork would compete with them (a call that
** leaves none ready has its spare replaced at once). The
** spares are the server's children (the maker forks them with
** CLONE_PARENT): the server has their statuses. A maker that dies is made
** again, at most once a second; meanwhile calls are forked as they come,
** as they are when no spare is ready.
*/

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <ev.h>

#include "interp_state.h"


typedef struct spare {
  pid_t pid;  /* 0: a free slot */
  int fd;  /* the server's end of its channel */
  ev_child w;
} spare;


static struct {
  int keep;  /* spares are kept (the server serves and will idle) */
  ev_watcher *onspare;  /* fed when a spare is ready */
  spare spares[PF_INTERP_MAXSPARES];
  int nspares;  /* ready */
  int want;  /* how many to keep ready */
  int making;  /* asked of the maker, not come yet */
  pid_t maker;  /* the spare maker, or 0 */
  int makerfd;  /* our end of its channel, or -1 */
  ev_io mw;
  ev_child mc;
  double makerborn;  /* when the last one was made */
  int wantmaker;  /* make one (outside ev_run) */
  pid_t dropped[PF_INTERP_MAXSPARES + 1];  /* killed: waited for at exit */
  int ndropped;
} P;


/* a spare or the maker we no longer watch: killed, waited for at exit */
static void drop (pid_t pid) {
  kill(pid, SIGKILL);  /* reaped by the loop, or before the exit */
  if (P.ndropped < PF_INTERP_MAXSPARES + 1)
    P.dropped[P.ndropped++] = pid;
}


/* spare i is no longer ours to watch (taken, dead or dropped) */
static void forgetspare (int i) {
  ev_child_stop(EV_DEFAULT, &P.spares[i].w);
  close(P.spares[i].fd);
  P.spares[i].pid = 0;
  P.nspares--;
}


/* no more spares from the maker (its channel closed) */
static void closemaker (void) {
  ev_io_stop(EV_DEFAULT, &P.mw);
  if (P.makerfd >= 0) close(P.makerfd);
  P.makerfd = -1;
  P.making = 0;
}


/* the maker is no longer ours to watch */
static void forgetmaker (void) {
  closemaker();
  ev_child_stop(EV_DEFAULT, &P.mc);
  P.maker = 0;
}


/* ask the maker for the spares that are missing; without one, have one
** made (outside ev_run, at most once a second) */
static void topup (void) {
  while (P.keep && P.nspares + P.making < P.want) {
    if (P.makerfd < 0) {
      if (pf_now() - P.makerborn >= 1.0 && !P.wantmaker) {
        P.wantmaker = 1;
        ev_break(EV_DEFAULT, EVBREAK_ALL);
      }
      return;
    }
    if (write(P.makerfd, "s", 1) != 1) return;
    P.making++;
  }
}


static void sparecb (struct ev_loop *loop, ev_child *w, int revents) {
  int i;
  (void)loop; (void)revents;
  for (i = 0; i < PF_INTERP_MAXSPARES && &P.spares[i].w != w; i++) ;
  if (i == PF_INTERP_MAXSPARES || P.spares[i].pid == 0) return;
  pf_ilog(0, LOG_WARNING, "spare executor %ld: status %d", (long)w->rpid,
          w->rstatus);
  forgetspare(i);
  topup();
}


/* a new spare from the maker: ready for the next call */
static void addspare (pid_t pid, int fd) {
  spare *s = P.spares;
  if (!P.keep || P.nspares == PF_INTERP_MAXSPARES) {
    drop(pid);
    close(fd);
    return;
  }
  while (s->pid != 0) s++;  /* a free slot */
  P.nspares++;
  s->pid = pid;
  s->fd = fd;
  setpgid(pid, pid);  /* as the spare does: whichever comes first */
  ev_child_init(&s->w, sparecb, pid, 0);
  ev_child_start(EV_DEFAULT, &s->w);
  if (kill(pid, 0) != 0 && errno == ESRCH) {  /* reaped already */
    pf_ilog(0, LOG_WARNING, "spare executor %ld: gone", (long)pid);
    forgetspare((int)(s - P.spares));
  }
}


/* the maker's messages: a spare's pid with the server's end of its
** channel, or -errno; EOF: the maker is gone */
static void makercb (struct ev_loop *loop, ev_io *w, int revents) {
  int32_t msg;
  int fd;
  ssize_t n;
  (void)loop; (void)revents;
  while ((n = pf_recvfdmsg(w->fd, &fd, &msg, sizeof(msg), MSG_DONTWAIT,
                           NULL)) == (ssize_t)sizeof(msg)) {
    if (P.making > 0) P.making--;
    if (msg > 0 && fd >= 0) addspare((pid_t)msg, fd);
    else {
      if (fd >= 0) close(fd);
      pf_ilog(0, LOG_WARNING, "spare maker: fork: %s", strerror(-msg));
    }
  }
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
    closemaker();  /* (its death is logged once reaped) */
    topup();
  }
  if (P.nspares > 0) ev_feed_event(EV_DEFAULT, P.onspare, EV_CUSTOM);
}


static void makerdiedcb (struct ev_loop *loop, ev_child *w, int revents) {
  (void)loop; (void)revents;
  pf_ilog(0, LOG_WARNING, "spare maker %ld: status %d", (long)w->rpid,
          w->rstatus);
  forgetmaker();
  topup();
}


/* the maker's channel and process, ours to watch */
static void watchmaker (pid_t pid, int fd) {
  P.maker = pid;
  P.makerfd = fd;
  fcntl(fd, F_SETFL, O_NONBLOCK);
  ev_io_set(&P.mw, fd, EV_READ);
  ev_io_start(EV_DEFAULT, &P.mw);
  ev_child_set(&P.mc, pid, 0);
  ev_child_start(EV_DEFAULT, &P.mc);
}


/* outside ev_run: the spare maker, if one is wanted. NULL in the server;
** in a spare it made (later), the call it took */
pf_ijob *pf_ispare_fork (void) {
  static pf_ijob job;
  int sv[2];
  pid_t pid;
  if (!P.wantmaker) return NULL;
  P.wantmaker = 0;
  P.makerborn = pf_now();
  if (P.maker > 0) kill(P.maker, SIGKILL);  /* (a stopped one, say) */
  forgetmaker();
  if (!P.keep || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
    return NULL;
  if ((pid = pf_fork()) == 0) {
    pf_iexec_spare(pf_iexec_maker(sv[1]), &job);
    return &job;
  }
  close(sv[1]);
  if (pid < 0) {
    pf_ilog(0, LOG_WARNING, "spare maker: fork: %s", strerror(errno));
    close(sv[0]);
    return NULL;
  }
  watchmaker(pid, sv[0]);
  topup();
  return NULL;
}


/*
** The call j to a ready spare: 1 with its pid when the spare has it, 0
** when there is none or it failed (the call is then forked). The spare
** answers one byte once it has the call; without it (a spare killed a
** moment ago keeps its socket while the kernel takes its memory apart)
** the call was not taken. That wait is bounded (1 s: a stopped spare).
** The spare is replaced once the call is over (pf_ispare_topup), or at
** once when none is left.
*/
int pf_ispare_take (const pf_ijob *j, pid_t *pid) {
  int i;
  for (i = 0; i < PF_INTERP_MAXSPARES; i++) {
    struct pollfd p;
    char ack = 0;
    if ((*pid = P.spares[i].pid) == 0) continue;
    p.fd = P.spares[i].fd;
    p.events = POLLIN;
    if (pf_iexec_handoff(p.fd, j) && poll(&p, 1, 1000) == 1)
      (void)!recv(p.fd, &ack, 1, MSG_DONTWAIT);
    forgetspare(i);
    if (ack == 'A') {
      if (P.nspares + P.making == 0) topup();
      return 1;
    }
    topup();
    pf_ilog(0, LOG_WARNING, "spare executor %ld: did not take the call",
            (long)*pid);
    kill(*pid, SIGKILL);  /* reaped by the loop */
  }
  return 0;
}


/* a call is over: the spare it took is replaced */
void pf_ispare_topup (void) {
  topup();
}


/* a call found no spare ready: one more is kept from now on */
void pf_ispare_more (void) {
  if (P.want < PF_INTERP_MAXSPARES) P.want++;
  topup();
}


/* spares from now on (keep) or not; onspare is fed when one is ready */
void pf_ispare_init (int keep, ev_watcher *onspare) {
  P.keep = keep;
  P.onspare = onspare;
  P.want = 2;
  P.makerfd = -1;
  P.wantmaker = keep;
  ev_io_init(&P.mw, makercb, -1, EV_READ);
  ev_child_init(&P.mc, makerdiedcb, 0, 0);
}


/* no more spares (the server drains): every spare and the maker killed */
void pf_ispare_stop (void) {
  int i;
  P.keep = 0;
  for (i = 0; i < PF_INTERP_MAXSPARES; i++) {
    if (P.spares[i].pid == 0) continue;
    drop(P.spares[i].pid);
    forgetspare(i);
  }
  if (P.maker > 0) drop(P.maker);
  forgetmaker();
}


/* in a new child: no watcher of ours survives */
void pf_ispare_forget (void) {
  int i;
  ev_io_stop(EV_DEFAULT, &P.mw);
  ev_child_stop(EV_DEFAULT, &P.mc);
  for (i = 0; i < PF_INTERP_MAXSPARES; i++)
    ev_child_stop(EV_DEFAULT, &P.spares[i].w);
}


/* before the server's exit: the spares and maker killed are gone */
void pf_ispare_wait (void) {
  int i;
  for (i = 0; i < P.ndropped; i++)
    waitpid(P.dropped[i], NULL, 0);  /* (or ECHILD: reaped already) */
}
