/*
** state.h: the master's state (the master and its workers) and the
** internal API of the master's files, bottom up: supervise.c (watchdogs),
** table.c (the worker table), status.c, signals.c, spawn.c, machine.c
** (the state machine), master.c (the Lua interface).
*/

#if !defined(state_h)
#define state_h

#include <signal.h>

#include <ev.h>

#include "prefork.h"


#define SURVIVED	1.0  /* seconds alive after which a death is no
                            ** failure to start (no backoff) */
#define BACKOFF0	0.1  /* first delay after a death before ready */
#define BACKOFFMAX	10.0  /* the cap of the doubling delay */
#define REFILL	0.1  /* seconds from a set ready to a standby's fork: the
                     ** new worker takes what waited first */

enum wstate { W_PENDING, W_STARTING, W_RUNNING, W_STOPPING };

/* room for the signals the master takes (signals.c) */
#define MAXSIGS	24


typedef struct master master;

/* a standby (opts.standby): a worker forked ahead, which waits on its
** socket for the worker it becomes (spawn.c); a copy of the set as it was
** at its fork, so any change of the set kills it (table.c) */
typedef struct standby {
  struct standby *next;
  master *m;
  pid_t pid;
  int slot;  /* its scoreboard slot */
  int ctl;  /* the master's end of its socket */
  int tfd;  /* its watchdog */
  int ready;  /* it said so: set up, its pages written */
  ev_io said;  /* ctl: its "ready" */
  ev_timer late;  /* not ready by boot_timeout: killed */
} standby;

typedef struct worker {
  struct worker *next;
  master *m;
  enum wstate state;
  pid_t pid;  /* 0 while pending */
  int ctx;  /* its context: a ref in the master's context table */
  int respawn;  /* replace it when it exits */
  int hold;  /* in a Lua call that may retire it: free it afterwards */
  int fails;  /* deaths (or boot timeouts) before ready, in a row */
  int survived;  /* it lived SURVIVED seconds */
  int crashes;  /* crashes (an error or a fatal signal) within SURVIVED
                ** seconds of the start, in a row, though it was ready */
  int exits;  /* of this id, since the master started */
  int slot;  /* its scoreboard slot, -1 none */
  int ctl;  /* the master's end of its socket, -1 none */
  int target;  /* ctl takes connections (accept = "master") */
  double started;
  struct worker *replaces;  /* retire that one when this one is ready */
  int stolen;  /* reaped by prefork.wait in a hook: status is its exit */
  int status;
  int ports;  /* its listeners (accept = "reuseport"), shared by the
              ** workers of its id (pf_ports_*); LUA_NOREF none */
  int due;  /* to be recycled (max_requests, max_memory), for why */
  char why[96];
  int hung;  /* timed out: told to log where it hangs, then KILLed */
  int tfd;  /* its watchdog (a timerfd it arms too), -1 none */
  char name[40];  /* its id, for the log */
  ev_timer timer;  /* spawn (PENDING), survived (STARTING, RUNNING),
                   ** kill (STOPPING) */
  ev_io ready;  /* its socket: "r" ready, "m" served its max_requests */
  ev_io watch;  /* its watchdog expired */
  ev_timer fallback;  /* KILL, a second after a timeout */
} worker;


struct master {
  lua_State *L;  /* the thread that runs the loop */
  worker *list;
  int stopping;  /* 0, 1 graceful, 2 immediate */
  int running;
  pid_t pid;
  int opts;  /* registry refs: the options (callbacks, listeners, ...) */
  int ctxs;  /* and the contexts of the workers */
  double graceful;  /* seconds a stopping worker gets before KILL */
  double timeout;  /* seconds a busy worker may go without a heartbeat */
  double boottimeout;  /* seconds from fork until ready */
  unsigned long maxrequests, jitter;  /* recycling after requests */
  double maxmemory;  /* bytes of RSS; recycling above; 0 none */
  int maxfails;  /* failures to start in a row that stop the master */
  double tickevery;  /* seconds between on_tick calls; 0 none */
  char user[64];  /* the workers run as this user ("": as the master) */
  uid_t uid;
  gid_t gid;
  double started;  /* monotonic */
  int standbys;  /* how many standbys to keep (opts.standby) */
  int sbfails;  /* standbys dead on their own, in a row */
  standby *spare;  /* the standbys */
  ev_timer refill;  /* forks the standbys that are missing */
  unsigned long respawns, timeouts, recycled;  /* since the start */
  unsigned long requests;  /* of the workers that are gone */
  worker *recycling;  /* the worker that drains for recycling, or NULL */
  char giveup[256];  /* why the master gave up, or "" */
  int strategy;  /* PF_ACCEPT_SHARED, PF_ACCEPT_MUTEX, PF_ACCEPT_REUSEPORT or PF_ACCEPT_MASTER */
  int lockfd;  /* accept = "mutex": the lock file, already unlinked */
  pf_handoff *handoff;  /* accept = "master" */
  pf_board *board;  /* the scoreboard, shared with the workers */
  pf_score *score;  /* its slots */
  unsigned char used[PF_MAXPROCS];
  void (*onsignal) (master *m, int sig, int n);  /* n of sig came */
  ev_signal sig[MAXSIGS];
  struct sigaction saved[MAXSIGS];  /* what the signals did before run */
  ev_child reaper;  /* every child of the process */
  ev_timer later;  /* handles the exits that prefork.wait took */
  ev_timer memory;  /* max_memory: the workers' RSS, once a second */
  ev_timer tick;  /* on_tick */
  ev_async counted;  /* TTIN and TTOU came (counted, not coalesced) */
  int waitready;  /* on_ready is due when every worker is ready */
  pid_t uppid;  /* an upgrade's new master, or 0 */
  int upfd;  /* it says it is ready there; -1 */
  double uptimeout;
  ev_io upio;
  ev_timer uptimer;
};


/* table.c: the worker table */
PF_API int pf_pushcb (lua_State *L, master *m, const char *name);
PF_API void pf_callhook (lua_State *L, const char *name, int nargs);
PF_API void pf_pushctx (lua_State *L, master *m, worker *w);
PF_API void pf_pushlisteners (lua_State *L, master *m);
PF_API void pf_untarget (master *m, worker *w);
PF_API void pf_dropports (lua_State *L, worker *w);
PF_API void pf_freeworker (lua_State *L, master *m, worker *w);
PF_API void pf_arm (worker *w, double delay);
PF_API void pf_schedule (master *m, worker *w, double delay);
PF_API double pf_backoff (int n);
PF_API void pf_retire (lua_State *L, master *m, worker *w, int sig);
PF_API int pf_newslot (master *m);
PF_API void pf_freeslot (master *m, int i);
PF_API void pf_standby_kill (master *m, standby **p);
PF_API void pf_standby_clear (master *m);
PF_API void pf_standby_kick (master *m, double delay);
PF_API int pf_standby_reaped (master *m, pid_t pid);
PF_API int pf_standby_count (master *m);

/* supervise.c: watchdogs (timeout, boot_timeout), memory */
PF_API int pf_watch_prepare (int *fd);
PF_API void pf_watch_start (master *m, worker *w);
PF_API void pf_watch_ready (master *m, worker *w);
PF_API void pf_watch_pause (worker *w);
PF_API void pf_watch_stop (worker *w);
PF_API void pf_killgroup (worker *w);
PF_API double pf_rss (pid_t pid);

/* status.c: the status endpoint */
PF_API void pf_status_start (master *m, pf_listener *l);
PF_API void pf_status_stop (void);
PF_API void pf_status_forget (void);

/* upgrade.c: the old master's side of an upgrade */
PF_API void pf_upgrade_watch (master *m, pid_t pid, int fd, double timeout);
PF_API int pf_upgrade_reaped (master *m, pid_t pid, int status);
PF_API void pf_upgrade_forget (master *m);

/* signals.c: the signals the master takes */
PF_API void pf_signals_start (master *m);
PF_API void pf_signals_stop (master *m);
PF_API void pf_signals_forget (master *m);

/* machine.c: the state machine */
PF_API worker *pf_newworker (lua_State *L, master *m, int idx, int ports);
PF_API void pf_replaces (lua_State *L, master *m, worker *w, worker *old);
PF_API void pf_master_stop (lua_State *L, master *m, int how,
                            const char *cause);
PF_API void pf_machine_start (master *m, double tick);
PF_API void pf_machine_waitready (lua_State *L, master *m);
PF_API void pf_machine_stop (master *m);

/* spawn.c: forking a worker, now or ahead (a standby) */
PF_API void pf_spawn (lua_State *L, master *m, worker *w);
PF_API int pf_spawn_standby (lua_State *L, master *m);

#endif
