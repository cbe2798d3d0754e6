/*
** lua-prefork: the internal API shared by the files of prefork.core.
** Nothing here is exported from the shared object: only luaopen_prefork_core is.
*/

#if !defined(prefork_h)
#define prefork_h

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
PF_API double pf_now (void);
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
PF_API void pf_reaped (pid_t pid, int status);
PF_API pid_t pf_takereaped (pid_t pid, int *status);
PF_API void pf_onreap (int (*hook) (void *ud, pid_t pid, int status),
                       void *ud);
PF_API void pf_open_proc (lua_State *L);
/* }====================================================== */


/* {======================================================
** sock.c: listeners and connection objects
** ======================================================= */

typedef struct pf_listener pf_listener;

/* a connection object: a stream socket with a read buffer */
typedef struct pf_conn {
  int fd;  /* -1 once closed */
  int counted;  /* a worker's accepted connection: in its inflight count */
  double timeout;  /* seconds for each read or write call; < 0: none */
  size_t maxline;  /* longest line "l" and "L" buffer; 0: no limit */
  double dl;  /* deadline of the call under way (monotonic); < 0: none */
  int wrote;  /* an answer went out and no byte came since: idle */
  int closing;  /* close(data): writing, then closing */
  char *buf;  /* read buffer; unread bytes are buf[r..w) */
  size_t cap, r, w;
} pf_conn;

PF_API pf_listener *pf_checklistener (lua_State *L, int idx);
PF_API int pf_listener_fd (const pf_listener *l);
PF_API void pf_listener_close (pf_listener *l);
PF_API int pf_listener_template (const pf_listener *l);
PF_API int pf_listener_reuseport (const pf_listener *l);
PF_API pf_listener *pf_listener_clone (lua_State *L, const pf_listener *tpl);
PF_API pf_conn *pf_newconn (lua_State *L);
PF_API int pf_waitfd (int fd, int events, double deadline);
PF_API void pf_open_sock (lua_State *L);
/* }====================================================== */


/* {======================================================
** worker.c: the worker side of a master (accept, stop flag, counters)
** ======================================================= */

/* one slot of the scoreboard the master shares with its workers */
typedef struct pf_score {
  unsigned long accepted;  /* connections accepted so far */
  long inflight;  /* connections accepted and not closed yet */
} pf_score;

/* where a worker's connections come from */
#define PF_SHARED	0  /* listeners shared with the other workers */
#define PF_CHANNEL	1  /* handed over by the master (accept = "master") */
#define PF_OWN	2  /* listeners of its own (accept = "reuseport") */
#define PF_MUTEX	3  /* shared, accepted under a lock (accept = "mutex") */

PF_API void pf_worker_setup (pf_listener **ls, int nls, int ctl, int mode,
                             pf_score *score, pid_t master);
PF_API int pf_worker_lock (int inherited);
PF_API int pf_worker_drains (void);
PF_API void pf_worker_closed (void);
PF_API void pf_worker_ready (void);
PF_API int pf_worker_accept (pf_conn *c);
PF_API void pf_worker_stoplistening (void);
PF_API int pf_worker_stopping (void);
struct pollfd;
PF_API const struct pollfd *pf_worker_fds (int *n);
PF_API void pf_open_worker (lua_State *L);
/* }====================================================== */


/* {======================================================
** serve.c: the event loop inside a worker
** ======================================================= */

/* how a wait ended */
#define PF_READY	1
#define PF_TIMEOUT	0
#define PF_STOPPING	(-1)

PF_API int pf_waitk (lua_State *L, int fd, int events, double deadline,
                     int idle, lua_KContext ctx, lua_KFunction k);
PF_API int pf_wakereason (lua_State *L);
PF_API int pf_intask (lua_State *L);
PF_API void pf_serve_forget (void);
PF_API void pf_open_serve (lua_State *L);
/* }====================================================== */


/* {======================================================
** interp.c: the prefork-interp server (interp*.c; their own header
** is interp.h, the wire's wire.h)
** ======================================================= */
PF_API void pf_open_interp (lua_State *L);
/* }====================================================== */


/* master.c */
PF_API void pf_open_master (lua_State *L);

/* pool.c */
PF_API void pf_open_pool (lua_State *L);

/* serial.c */
PF_API void pf_open_serial (lua_State *L);

/* fdpass.c */
PF_API int pf_tofd (lua_State *L, int idx);
PF_API ssize_t pf_sendfdmsg (int sock, int fd, const void *data, size_t n,
                             int flags);
PF_API ssize_t pf_recvfdmsg (int sock, int *fd, void *data, size_t n,
                             int flags, int *trunc);
PF_API int pf_sendfd (int sock, int fd);
PF_API int pf_recvfd (int sock, int *fd);
PF_API void pf_open_fdpass (lua_State *L);

#endif
