/*
** interp_log.c: the prefork-interp server's log. A line goes to syslog
** (unless log_facility is ""), to the Lua log sink if the script set one
** (core.setlog), and, for the first call's errors and warnings, to the
** first caller's stderr: until that call is done, the one place a user
** sees why the server did not start serving.
*/

#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>
#include <unistd.h>

#include "interp_state.h"


static struct {
  lua_State *L;  /* for the log sink; NULL in an executor */
  int syslog;
  int first;  /* the first caller's stderr, or -1 */
} G = {NULL, 0, -1};


void pf_ilog_setup (lua_State *L, int sys, int first) {
  G.L = L;
  G.syslog = sys;
  G.first = first;
}


/* no more lines to the first caller (its call is done) */
void pf_ilog_closefirst (void) {
  if (G.first >= 0) close(G.first);
  G.first = -1;
}


/* in a new child: no Lua log sink (the state is the child's now) */
void pf_ilog_forget (void) {
  G.L = NULL;
}


static const char *levelname (int prio) {
  switch (prio) {
    case LOG_ERR: return "error";
    case LOG_WARNING: return "warn";
    default: return "info";
  }
}


/* a line to the first caller's stderr */
static void tofirst (const char *msg) {
  char line[1100];
  int n = snprintf(line, sizeof(line), "prefork-interp: %s\n", msg);
  if (n > 0)
    (void)!write(G.first, line, (size_t)n < sizeof(line) ? (size_t)n
                                                       : sizeof(line) - 1);
}


/* a line of the log at prio (LOG_ERR, LOG_WARNING, LOG_INFO); first: it
** is about the first call */
void pf_ilog (int first, int prio, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (G.syslog)
    syslog(prio, "%s", msg);
  if (G.L != NULL) {
    int t = lua_getfield(G.L, LUA_REGISTRYINDEX, "prefork.log");
    lua_pop(G.L, 1);
    if (t == LUA_TFUNCTION)
      pf_log(G.L, levelname(prio), "interp: %s", msg);
  }
  if (first && G.first >= 0 && prio <= LOG_WARNING)
    tofirst(msg);
}
