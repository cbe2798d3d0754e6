/*
** lua-prefork: the internal API shared by the files of prefork.core.
** Nothing here is exported from the shared object: only luaopen_prefork_core is.
**
** The files, in layers: each calls only files of the layers below it
** (docs/architecture.md draws them and says where a new feature goes).
**
**   9  core.c                  registers the rest
**   8  master.c  notify.c      the master's Lua interface and run; sd_notify
**   7  machine.c               its state machine
**   6  spawn.c                 forking a worker
**   5  status.c  upgrade.c     its status endpoint; an upgrade's old side
**      table.c                 its worker table (the master's files share
**      supervise.c signals.c   state.h); watchdogs; its signals
**      pool.c                  a process pool
**      interp*.c               the prefork-interp server (interp_state.h)
**   4  serve.c                 worker:serve, the worker's accept loop
**   3  worker.c                the worker side of a master
**   2  accept.c                the accept strategies, both sides
**   1  fdpass.c                SCM_RIGHTS, peer credentials
**      inherit.c               inherited listeners (uses listen.c)
**      connect.c               outgoing connections, socket options (uses
**                              listen.c's address parser and conn.c)
**      listen.c                listening sockets (uses conn.c)
**      conn.c                  connection objects, fds of Lua values
**   0  task.c                  the coroutine scheduler (uses the rest of 0)
**      score.c                 the scoreboard; a worker's heartbeat
**      loop.c proc.c serial.c  libev and logging; processes; values
**      wire.c                  byte-level encodings (no Lua: the client's too)
*/

#if !defined(prefork_h)
#define prefork_h

#include <signal.h>
#include <sys/types.h>

#include "lua.h"
#include "lauxlib.h"

#define PF_VERSION	"0.1.0"

#define PF_API	__attribute__((visibility("hidden"))) extern

#if defined(__GNUC__)
#define PF_NORETURN	__attribute__((noreturn))
#define PF_PRINTF(f,a)	__attribute__((format(printf, f, a)))
#else
#define PF_NORETURN
#define PF_PRINTF(f,a)
#endif

/* metatable names; they appear in argument errors */
#define PF_CONN		"prefork.conn"
#define PF_LISTENER	"prefork.listener"
#define PF_MASTER	"prefork.master"

/* most worker processes one master tracks at once (scoreboard size) */
#if !defined(PF_MAXPROCS)
#define PF_MAXPROCS	1024
#endif

/* add d to a counter in shared memory that only this process writes */
#define pf_add(c, d)  __atomic_store_n(&(c), __atomic_load_n(&(c), \
                        __ATOMIC_RELAXED) + (d), __ATOMIC_RELAXED)


/* {======================================================
** loop.c: the one libev binding, protected calls, logging
** ======================================================= */

struct ev_loop;

PF_API struct ev_loop *pf_loop (void);
PF_API void pf_loop_close (void);
PF_API void pf_onfork (void (*forget) (void *), void *ud);
PF_API void pf_loop_child (void);
PF_API int pf_haveloop (void);
PF_API int pf_pcall (lua_State *L, int nargs, int nresults);
PF_API void pf_log (lua_State *L, const char *level, const char *fmt, ...)
  PF_PRINTF(3, 4);
PF_API int pf_fail (lua_State *L, const char *what);
PF_API int pf_log_reopen (void);
PF_API int pf_failwith (lua_State *L, const char *why, int en);
PF_API double pf_now (void);
PF_API void pf_newclass (lua_State *L, const char *name,
                         const luaL_Reg *meth, const luaL_Reg *metameth);
PF_API void pf_open_loop (lua_State *L);
/* }====================================================== */


/* {======================================================
** proc.c: fork, the child-side reset, wait status, signals, titles
** ======================================================= */

PF_API pid_t pf_fork (void);
PF_API void pf_exit (int status) PF_NORETURN;
PF_API void pf_child_run (lua_State *L, int nargs) PF_NORETURN;
PF_API int pf_signum (lua_State *L, int idx);
PF_API const char *pf_signame (int sig);
PF_API int pf_pushstatus (lua_State *L, int status);
PF_API void pf_settitle (const char *title);
PF_API void pf_settitlev (const char *const *argv, int argc);
PF_API size_t pf_prefault (void);
PF_API void pf_reaped (pid_t pid, int status);
PF_API pid_t pf_takereaped (pid_t pid, int *status);
PF_API void pf_onreap (int (*hook) (void *ud, pid_t pid, int status),
                       void *ud);
PF_API int pf_becomeuser (const char *name, uid_t uid, gid_t gid,
                          const char **what);
PF_API void pf_open_proc (lua_State *L);
/* }====================================================== */


/* serial.c: the serialiser of Lua values */
PF_API int pf_decode (lua_State *L, const char *s, size_t len);
PF_API void pf_open_serial (lua_State *L);


/* {======================================================
** score.c: the scoreboard, and a worker's heartbeat in its slot
** ======================================================= */

/* one slot of the scoreboard the master shares with its workers; the
** worker writes it, but for limit (the master's, set before the fork)
** and armed (both) */
typedef struct pf_score {
  unsigned long accepted;  /* connections accepted so far */
  long inflight;  /* connections accepted and not closed yet */
  unsigned long requests;  /* connections, and what worker:count added */
  unsigned long limit;  /* max_requests of this worker (0: none) */
  long beat;  /* the last heartbeat, ms of pf_coarse */
  long hung;  /* ms without one, when the master found it hung */
  int busy;  /* out of an idle wait */
  int armed;  /* the watchdog is armed */
  int accepting;  /* in serve: PF_ACCEPTING, PF_RESTING (balance) or 0 */
} pf_score;

/* the scoreboard: a slot per worker, and the bound of the slots in use
** (the master's: the lowest free slot is taken) */
typedef struct pf_board {
  pf_score slot[PF_MAXPROCS];
  int top;  /* no slot at or above it is in use */
} pf_board;

/* a serve worker's balance state, in its slot: it waits on the shared
** listeners, or it serves but left their queues for a moment */
#define PF_ACCEPTING	2
#define PF_RESTING	1

PF_API double pf_coarse (void);
PF_API double pf_score_beat (const pf_score *s);
PF_API void pf_score_arm (int fd, double secs);
PF_API void pf_score_bind (pf_board *b, pf_score *s, int watchdog,
                           double timeout);
PF_API void pf_score_unbind (void);
PF_API pf_score *pf_score_mine (void);
PF_API void pf_score_running (lua_State *L);
PF_API lua_State *pf_score_current (void);
PF_API void pf_score_accepting (int state);
PF_API int pf_score_ahead (void);
PF_API int pf_score_leave (void);
PF_API int pf_score_stayout (void);
PF_API int pf_score_idle (void);
PF_API void pf_beat (void);
PF_API void pf_busy (int busy);
PF_API void pf_score_init (pf_score *s);
PF_API int pf_score_disarm (pf_score *s);
/* }====================================================== */


/* {======================================================
** task.c: the coroutine scheduler
** ======================================================= */

/* how a wait ended */
#define PF_READY	1
#define PF_TIMEOUT	0
#define PF_STOPPING	(-1)

PF_API double pf_deadline (double timeout);
PF_API int pf_waitfd (int fd, int events, double deadline);
/* pf_waitk's flags: a wait for a new request on an idle connection; a
** wait on the same open file as the caller's previous such wait, unless
** pf_fdclosed was called since (whoever closes or hands over the fd of
** a connection calls it first) */
#define PF_WAITIDLE	1
#define PF_WAITSAMEFD	2

PF_API int pf_waitk (lua_State *L, int fd, int events, double deadline,
                     int flags, lua_KContext ctx, lua_KFunction k);
PF_API void pf_fdclosed (void);
PF_API int pf_wakereason (lua_State *L);
PF_API int pf_intask (lua_State *L);
PF_API int pf_pushwait (lua_State *L, int how);
PF_API struct ev_loop *pf_task_open (lua_State *L);
PF_API int pf_task_spawn (lua_State *L, int nargs, int own, int now);
PF_API void pf_task_run (void);
PF_API void pf_task_stop (double linger);
PF_API int pf_task_stopping (void);
PF_API void pf_task_close (void);
PF_API void pf_task_forget (void);
PF_API void pf_open_task (lua_State *L);
/* }====================================================== */


/* {======================================================
** conn.c: connection objects; the fds of Lua values
** ======================================================= */

/* a connection object: a stream socket with a read buffer */
typedef struct pf_conn {
  int fd;  /* -1 once closed */
  long *counter;  /* decremented once it is closed (a worker's count of
                  ** open connections), or NULL */
  double timeout;  /* seconds for each read or write call; < 0: none */
  size_t maxline;  /* longest line "l" and "L" buffer; 0: no limit */
  double dl;  /* deadline of the call under way (monotonic); -1: none;
              ** conn.c's LATER: from its first wait */
  int wrote;  /* an answer went out and no byte came since: idle */
  int outgoing;  /* we opened it (prefork.connect): never idle, since a
                 ** read after a write waits for an answer, not a request */
  int closing;  /* close(data): writing, then closing */
  int drained;  /* the last read emptied the socket: wait before the next */
  char *buf;  /* read buffer; unread bytes are buf[r..w) */
  size_t cap, r, w;
} pf_conn;

PF_API pf_conn *pf_newconn (lua_State *L);
PF_API int pf_tofd (lua_State *L, int idx);
PF_API int pf_tofdin (lua_State *L, int idx, int i, int arg);
PF_API void pf_open_conn (lua_State *L);
/* }====================================================== */


/* {======================================================
** listen.c: listening sockets
** ======================================================= */

typedef struct pf_listener pf_listener;

PF_API pf_listener *pf_checklistener (lua_State *L, int idx);
PF_API int pf_listener_fd (const pf_listener *l);
PF_API void pf_listener_close (pf_listener *l);
PF_API int pf_listener_template (const pf_listener *l);
PF_API int pf_listener_sibling (const pf_listener *l);
PF_API pf_listener *pf_listener_clone (lua_State *L, const pf_listener *tpl);
PF_API pf_listener *pf_listener_wrap (lua_State *L, int fd);
PF_API void pf_parseaddr (lua_State *L, const char *a, char *host, size_t hs,
                          const char **port);
struct sockaddr_un;
PF_API void pf_unixaddr (lua_State *L, const char *path,
                         struct sockaddr_un *sun);
PF_API int pf_gaifail (lua_State *L, int r);
PF_API void pf_open_listen (lua_State *L);
/* }====================================================== */


/* connect.c: prefork.connect; the socket calls of prefork.socket */
PF_API void pf_open_connect (lua_State *L);


/* inherit.c: inherited listening sockets, their variables */
PF_API void pf_open_inherit (lua_State *L);


/* {======================================================
** fdpass.c: SCM_RIGHTS, peer credentials
** ======================================================= */

PF_API ssize_t pf_sendfdmsg (int sock, int fd, const void *data, size_t n,
                             int flags);
PF_API ssize_t pf_recvfdmsg (int sock, int *fd, void *data, size_t n,
                             int flags, int *trunc);
PF_API int pf_sendfd (int sock, int fd);
PF_API int pf_recvfd (int sock, int *fd);
PF_API void pf_open_fdpass (lua_State *L);
/* }====================================================== */


/* {======================================================
** accept.c: the accept strategies, the worker's side and the master's
** ======================================================= */

/* the strategies (accept = "...") */
#define PF_ACCEPT_SHARED	0  /* listeners shared by the workers */
#define PF_ACCEPT_MUTEX	1  /* shared, accepted under a lock */
#define PF_ACCEPT_REUSEPORT	2  /* SO_REUSEPORT sockets of each worker id */
#define PF_ACCEPT_MASTER	3  /* the master accepts and hands over */

typedef struct pf_handoff pf_handoff;

PF_API int pf_checkstrategy (lua_State *L, int idx);
PF_API void pf_accept_setup (pf_listener **ls, int n, int ctl, int mode);
PF_API int pf_accept_fds (int *fds);
PF_API int pf_accept_round (pf_conn *c, int *gone);
PF_API int pf_accept_lock (int wait);
PF_API void pf_accept_unlock (void);
PF_API int pf_accept_openlock (int inherited);
PF_API int pf_accept_drains (void);
PF_API void pf_accept_drained (void);
PF_API void pf_accept_close (void);
PF_API void pf_accept_forget (void);
PF_API int pf_accept_makelock (void);
PF_API int pf_ports_new (lua_State *L, int idx);
PF_API int pf_ports_share (lua_State *L, int ref);
PF_API void pf_ports_release (lua_State *L, int ref);
PF_API void pf_ports_only (lua_State *L, int ref);
PF_API pf_handoff *pf_handoff_new (lua_State *L, int idx);
PF_API int pf_handoff_add (pf_handoff *h, int fd,
                           const unsigned long *accepted,
                           const long *inflight);
PF_API void pf_handoff_remove (pf_handoff *h, int fd);
PF_API void pf_handoff_pause (pf_handoff *h);
PF_API void pf_handoff_free (pf_handoff *h);
/* }====================================================== */


/* {======================================================
** worker.c: the worker side of a master (stop flag, readiness, counters)
** ======================================================= */

/* what a new worker is given (spawn.c fills it in) */
typedef struct pf_workerspec {
  lua_State *L;  /* its main thread */
  pf_listener **ls;  /* the listeners it accepts on */
  int nls;
  int ctl;  /* its socket to the master */
  int mode;  /* the accept strategy */
  pf_board *board;  /* the master's scoreboard */
  pf_score *score;  /* its slot there */
  int watchdog;  /* its watchdog timerfd, -1 none */
  double timeout;  /* seconds without a heartbeat; <= 0: none */
  pid_t master;
  const char *name;  /* its id, for the log */
} pf_workerspec;

/* seconds a worker stops accepting after an accept failed (nginx: 0.5) */
#define PF_ACCEPTPAUSE	0.5

/* the exit status of a worker that timed out (as timeout(1)'s) */
#define PF_EXIT_TIMEDOUT	124

/* the signals a master sends a hung worker, and that a worker gets when
** its master dies */
#define PF_SIGTIMEOUT	(SIGRTMIN + 4)
#define PF_SIGDOOM	(SIGRTMIN + 5)

PF_API void pf_worker_setup (const pf_workerspec *spec);
PF_API void pf_worker_rename (const char *name);
PF_API void pf_worker_ready (void);
PF_API int pf_worker_accept (pf_conn *c);
PF_API void pf_worker_acceptfailed (lua_State *L, int en);
PF_API void pf_worker_acceptworked (lua_State *L);
PF_API void pf_worker_dropwaitset (void);
PF_API void pf_worker_stoplistening (void);
PF_API int pf_worker_stopping (void);
struct pollfd;
PF_API const struct pollfd *pf_worker_fds (int *n);
PF_API void pf_open_worker (lua_State *L);
/* }====================================================== */


/* serve.c: worker:serve */
PF_API void pf_serve_forget (void);
PF_API void pf_open_serve (lua_State *L);


/* {======================================================
** interp.c: the prefork-interp server (interp*.c; their own header
** is interp_state.h, the wire's wire.h)
** ======================================================= */
PF_API void pf_open_interp (lua_State *L);
/* }====================================================== */


/* master.c */
PF_API void pf_open_master (lua_State *L);

/* notify.c: sd_notify */
PF_API void pf_open_notify (lua_State *L);

/* pool.c */
PF_API void pf_open_pool (lua_State *L);

#endif
