/*
** interp_state.h: what the files of the prefork-interp server share.
** From the bottom up (a file calls only the files above it in this list):
**   wire.c           the wire, pure (src/wire.h)
**   interp_exec.c    the executor: the per-call child, its quick end and
**                    early status, the spare maker and the spares
**   interp_call.c    one call's connection: its request read step by
**                    step, the signal bytes after it, its status
**   interp_log.c     the server's log
**   interp_spare.c   the server's side of the spares and their maker
**   interp_server.c  the server: calls, accepting, autoreload, idling,
**                    its loop
**   interp.c         the Lua entry (core.interp_*)
*/

#if !defined(interp_state_h)
#define interp_state_h

#include <signal.h>
#include <sys/types.h>

#include "prefork.h"
#include "wire.h"


/* an executor's "I exit with this code" to its server (sigqueue'd) */
#define PF_SIGREPORT	(SIGRTMIN + 3)

/* in a report's value: the executor sends that status to its client
** itself (the code is in the low byte) */
#define PF_REPORTSENDS	0x100

/* seconds a connection has, from its greeting on, to send its whole
** request; until then it holds no server slot */
#if !defined(PF_INTERP_REQTIMEOUT)
#define PF_INTERP_REQTIMEOUT	2.0
#endif
/* most connections the server reads requests from at once */
#if !defined(PF_INTERP_MAXPENDING)
#define PF_INTERP_MAXPENDING	32
#endif
/* most spare executors kept ready (two are; calls that find none raise
** the count up to this) */
#if !defined(PF_INTERP_MAXSPARES)
#define PF_INTERP_MAXSPARES	3
#endif


/* a call's request, as its executor needs it */
typedef struct pf_ijob {
  int fds[4];  /* the caller's 0, 1, 2 (nfds of them so far), then the
               ** call's connection (PF_CALLFD: the executor answers there
               ** itself), or -1 */
  int nfds;
  char *req;  /* the request; r points into it */
  size_t len;
  pf_req r;
} pf_ijob;


#define PF_CALLFD	3  /* in pf_ijob.fds */

/* what every executor of a server needs of it (set once) */
typedef struct pf_iexeccfg {
  const int *keep;  /* fds the executors keep, sorted */
  int nkeep;
  const char *argv0;  /* this program's argv[0], before the titles */
  const char *sparetitle;  /* a spare's process title, or NULL */
  const char *makertitle;  /* the spare maker's, or NULL */
  pid_t server;  /* the server */
  int report;  /* it takes early statuses */
  int syslog;  /* it logs to syslog */
} pf_iexeccfg;


/* {======================================================
** interp_exec.c
** ======================================================= */
PF_API void pf_iexec_setup (const pf_iexeccfg *cfg);
PF_API void pf_iexec_closeabove (int also);
PF_API void pf_iexec_become (pf_ijob *j);
PF_API int pf_iexec_maker (int chan);
PF_API void pf_iexec_spare (int chan, pf_ijob *j);
PF_API int pf_iexec_handoff (int chan, const pf_ijob *j);
PF_API int pf_iexec_sentinel (lua_State *L);
PF_API int pf_iexec_setexit (lua_State *L);
/* }====================================================== */


/* {======================================================
** interp_call.c
** ======================================================= */

/* where a call is */
enum { PF_CSIGBYTE, PF_CFDS, PF_CLEN, PF_CBODY, PF_CREADY, PF_CRUN,
       PF_CGONE };

/* one connection of the server, from its greeting to its status */
typedef struct pf_icall {
  int fd;  /* the connection */
  int state;  /* PF_C* */
  unsigned char lenb[4];
  size_t got;  /* bytes of lenb or of the request so far */
  pf_ijob job;
  pid_t pid;  /* its executor, once there is one; 0 once reaped */
  int early;  /* the early status (sent, or the executor sends it), or -1 */
  int byexec;  /* the executor sends the early status itself */
} pf_icall;

/* what a step of the request did */
#define PF_CALL_MORE	0  /* nothing more to read now */
#define PF_CALL_DONE	1  /* the request is complete */
#define PF_CALL_LEFT	2  /* the client went away before its request */
#define PF_CALL_BAD	3  /* a bad call: *why (and errno if not 0) */

PF_API int pf_icall_greet (pf_icall *c);
PF_API int pf_icall_read (pf_icall *c, const char **why, int *en);
PF_API int pf_icall_signals (pf_icall *c, int *ignored);
PF_API void pf_icall_answer (pf_icall *c, int status);
PF_API void pf_icall_answered (pf_icall *c, int status);
PF_API void pf_icall_interrupt (pf_icall *c);
PF_API void pf_icall_close (pf_icall *c);
/* }====================================================== */


/* {======================================================
** interp_log.c, interp_spare.c
** ======================================================= */
PF_API void pf_ilog_setup (lua_State *L, int sys, int first);
PF_API void pf_ilog_closefirst (void);
PF_API void pf_ilog_forget (void);
PF_API void pf_ilog (int first, int prio, const char *fmt, ...)
  PF_PRINTF(3, 4);

struct ev_watcher;
PF_API void pf_ispare_init (int keep, struct ev_watcher *onspare);
PF_API pf_ijob *pf_ispare_fork (void);
PF_API int pf_ispare_take (const pf_ijob *j, pid_t *pid);
PF_API void pf_ispare_more (void);
PF_API void pf_ispare_topup (void);
PF_API void pf_ispare_stop (void);
PF_API void pf_ispare_forget (void);
PF_API void pf_ispare_wait (void);
/* }====================================================== */


/* {======================================================
** interp_server.c
** ======================================================= */

/* the server's options, from prefork.interp */
typedef struct pf_iopts {
  pf_ienv env;  /* PREFORK_INTERP */
  char **files;  /* autoreload list */
  int nfiles;
  int *keep;  /* fds the executors keep, sorted */
  int nkeep;
  long max_servers;
  double idle_timeout;
  long max_errors;
  int syslog;  /* log to syslog (opened by the caller) */
  const char *servertitle, *sparetitle, *makertitle;
} pf_iopts;

PF_API void pf_iserver_start (lua_State *L, pf_iopts *o);
PF_API pf_ijob *pf_iserver_run (void);
/* }====================================================== */

#endif
