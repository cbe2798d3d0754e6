/*
** table.h: the master's worker table, which the files of the master share
** (table.c, spawn.c, master.c): the master, its workers, and the table's operations.
*/

#if !defined(table_h)
#define table_h

#include <signal.h>

#include <ev.h>

#include "prefork.h"


#define READYAFTER	1.0  /* seconds alive that make a worker ready */
#define BACKOFF0	0.1  /* first delay after a death before ready */
#define BACKOFFMAX	10.0  /* the cap of the doubling delay */

enum wstate { W_PENDING, W_STARTING, W_RUNNING, W_STOPPING };

/* room for the signals the master takes (master.c's msigs) */
#define MAXSIGS	32


typedef struct master master;

typedef struct worker {
  struct worker *next;
  master *m;
  enum wstate state;
  pid_t pid;  /* 0 while pending */
  int ctx;  /* its context: a ref in the master's context table */
  int respawn;  /* replace it when it exits */
  int hold;  /* in a Lua call that may retire it: free it afterwards */
  int fails;  /* deaths before ready, in a row */
  int exits;  /* of this id, since the master started */
  int slot;  /* its scoreboard slot, -1 none */
  int ctl;  /* read end of its readiness pipe, -1 none */
  int target;  /* ctl takes connections (accept = "master") */
  double started;
  struct worker *replaces;  /* retire that one when this one is ready */
  int stolen;  /* reaped by prefork.wait in a hook: status is its exit */
  int status;
  int ports;  /* its listeners (accept = "reuseport"), shared by the
              ** workers of its id (pf_ports_*); LUA_NOREF none */
  char name[40];  /* its id, for the log */
  ev_timer timer;  /* spawn (PENDING), ready (STARTING), kill (STOPPING) */
  ev_io ready;  /* readiness pipe */
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
  int strategy;  /* PF_ACCEPT_SHARED, PF_ACCEPT_MUTEX, PF_ACCEPT_REUSEPORT or PF_ACCEPT_MASTER */
  int lockfd;  /* accept = "mutex": the lock file, already unlinked */
  pf_handoff *handoff;  /* accept = "master" */
  pf_score *score;  /* PF_MAXPROCS slots shared with the workers */
  unsigned char used[PF_MAXPROCS];
  ev_signal sig[MAXSIGS];
  struct sigaction saved[MAXSIGS];  /* what the signals did before run */
  ev_child reaper;  /* every child of the process */
  ev_timer later;  /* handles the exits that prefork.wait took */
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
PF_API double pf_backoff (worker *w);
PF_API void pf_retire (lua_State *L, master *m, worker *w, int sig);
PF_API int pf_newslot (master *m);

/* spawn.c: forking a worker */
PF_API void pf_spawn (lua_State *L, master *m, worker *w);

#endif
