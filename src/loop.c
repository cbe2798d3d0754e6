/*
** loop.c: the one libev binding of prefork.core, the single protected
** call path for Lua code run from C, and the log sink.
**
** The libev default loop is the only one that can watch children, so it
** is the master's loop. It is created on first use, never at require
** time: while it exists libev reaps every child of the process, which
** would break os.execute and prefork.wait in programs that never start
** a master.
*/

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>

#include "prefork.h"


#define LOGSINK	"prefork.log"


static int haveloop = 0;

/* what the loop's owner (the master) drops in a new child */
static void (*forgetfn) (void *) = NULL;
static void *forgetud = NULL;


/* libev calls this instead of abort() alone when a system call it cannot
** do without fails (epoll_wait with EBADF, say) */
static void syserr (const char *msg) {
  char buf[256];
  int n = snprintf(buf, sizeof(buf), "prefork[%ld]: libev: %s: %s\n",
                   (long)getpid(), msg, strerror(errno));
  if (n > 0)
    (void)!write(2, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf));
  abort();
}


struct ev_loop *pf_loop (void) {
  struct ev_loop *loop;
  if (!haveloop)
    ev_set_syserr_cb(syserr);
  loop = ev_default_loop(EVFLAG_AUTO);
  haveloop = (loop != NULL);
  return loop;
}


int pf_haveloop (void) {
  return haveloop;
}


/*
** Destroy the default loop: in the master after its run (so that the
** process reaps its own children again), and in a new child, where the
** copy is of no use. The caller has stopped its signal and child
** watchers first: libev keeps those in process-wide tables.
*/
void pf_loop_close (void) {
  if (haveloop) {
    ev_loop_destroy(EV_DEFAULT);
    haveloop = 0;
  }
}


void pf_onfork (void (*forget) (void *), void *ud) {
  forgetfn = forget;
  forgetud = ud;
}


/* in a new child: the owner forgets its watchers and fds, then the loop
** goes; no system call here touches the master's epoll set */
void pf_loop_child (void) {
  if (forgetfn != NULL)
    forgetfn(forgetud);
  forgetfn = NULL;
  pf_loop_close();
}


double pf_now (void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}


/*
** The fail triple of a failed system call: nil, "what: strerror", errno.
** [-0, +3, m]
*/
int pf_fail (lua_State *L, const char *what) {
  int en = errno;  /* Lua API calls may change it */
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s", what, strerror(en));
  lua_pushinteger(L, en);
  return 3;
}


/* a failure named by the caller: nil, why, en [-0, +3, m] */
int pf_failwith (lua_State *L, const char *why, int en) {
  luaL_pushfail(L);
  lua_pushstring(L, why);
  lua_pushinteger(L, en);
  return 3;
}


/* message handler: the error message with a traceback [-1, +1, m] */
static int traceback (lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)",
                          luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}


/*
** Call the function below the nargs arguments on the stack, protected,
** with a traceback. On error the message is left on the stack in place
** of the results. Every call from C into user code goes through here.
** [-(nargs+1), +(nresults|1), -]
*/
int pf_pcall (lua_State *L, int nargs, int nresults) {
  int status;
  int base = lua_gettop(L) - nargs;  /* function index */
  luaL_checkstack(L, 4, "prefork: stack overflow");
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  status = lua_pcall(L, nargs, nresults, base);
  lua_remove(L, base);
  return status;
}


static void writeall (int fd, const char *s, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    s += w; n -= (size_t)w;
  }
}


/* {------------------------------------------------------
** The log file (the `log = "path"` option): stderr appends to it, in the
** master and in the workers (fd 2 is inherited), and every line of ours
** begins with an ISO 8601 time. USR1 opens it again (logrotate moved it).
** ------------------------------------------------------- */

static char logpath[4096];  /* "" none */


/* open the log file again on fd 2: 0, or -1 with errno (async-signal-safe:
** the workers' USR1 handler calls it) */
int pf_log_reopen (void) {
  int fd;
  if (logpath[0] == '\0') return 0;
  fd = open(logpath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return -1;
  if (fd != 2) {
    dup2(fd, 2);  /* (fd 2 itself stays inherited) */
    close(fd);
  }
  return 0;
}


/* core.logfile(path) -> true | fail: stderr appends to path from now on */
static int l_logfile (lua_State *L) {
  size_t n;
  const char *path = luaL_checklstring(L, 1, &n);
  luaL_argcheck(L, n > 0 && n < sizeof(logpath), 1, "empty or too long");
  memcpy(logpath, path, n + 1);
  if (pf_log_reopen() != 0) {
    logpath[0] = '\0';
    return pf_fail(L, "open");
  }
  lua_pushboolean(L, 1);
  return 1;
}


/* core.reopenlog() -> true | fail (nothing to do without a log file) */
static int l_reopenlog (lua_State *L) {
  if (pf_log_reopen() != 0) return pf_fail(L, "open");
  lua_pushboolean(L, logpath[0] != '\0');
  return 1;
}


/* the head of a line: "[time ]prefork[pid]: " */
static size_t linehead (char *head, size_t size) {
  size_t n = 0;
  if (logpath[0] != '\0') {
    time_t t = time(NULL);
    struct tm tm;
    if (localtime_r(&t, &tm) != NULL)
      n = strftime(head, size, "%Y-%m-%dT%H:%M:%S%z ", &tm);
  }
  return n + (size_t)snprintf(head + n, size - n, "prefork[%ld]: ",
                              (long)getpid());
}

/* }------------------------------------------------------ */


/* one line to stderr in a single write, so that lines of several
** processes do not interleave */
static void logstderr (const char *msg) {
  char head[64];
  size_t hl = linehead(head, sizeof(head));
  size_t ml = strlen(msg);
  char *line = (char *)malloc(hl + ml + 1);
  if (line == NULL) {  /* no memory: still say it, in pieces */
    writeall(2, head, hl); writeall(2, msg, ml); writeall(2, "\n", 1);
    return;
  }
  memcpy(line, head, hl);
  memcpy(line + hl, msg, ml);
  line[hl + ml] = '\n';
  writeall(2, line, hl + ml + 1);
  free(line);
}


/*
** Log one event: to the Lua sink set with core.setlog, or to stderr.
** A sink that raises is reported on stderr with the message it lost.
** [-0, +0, -]
*/
void pf_log (lua_State *L, const char *level, const char *fmt, ...) {
  char small[512];
  char *msg = small;
  va_list ap;
  int n;
  va_start(ap, fmt);
  n = vsnprintf(small, sizeof(small), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof(small) && (msg = (char *)malloc((size_t)n + 1))) {
    va_start(ap, fmt);
    vsnprintf(msg, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  if (msg == NULL) msg = small;  /* truncated, but said */
  if (L == NULL || !lua_checkstack(L, 4))
    logstderr(msg);
  else if (lua_getfield(L, LUA_REGISTRYINDEX, LOGSINK) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    logstderr(msg);
  }
  else {
    lua_pushstring(L, level);
    lua_pushstring(L, msg);
    if (pf_pcall(L, 2, 0) != LUA_OK) {
      logstderr(msg);
      logstderr(lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  if (msg != small) free(msg);
}


/* a metatable name for userdata with methods meth (its __index) and
** metamethods metameth */
void pf_newclass (lua_State *L, const char *name, const luaL_Reg *meth,
                  const luaL_Reg *metameth) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, metameth, 0);
  lua_newtable(L);
  luaL_setfuncs(L, meth, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}


/* core.setlog([fn]): the sink of every log line, nil for stderr */
static int l_setlog (lua_State *L) {
  if (!lua_isnoneornil(L, 1))
    luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, LOGSINK);
  return 0;
}


/* core.log(level, message): a line through the same sink */
static int l_log (lua_State *L) {
  const char *level = luaL_checkstring(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  pf_log(L, level, "%s", msg);
  return 0;
}


/* core.now(): monotonic seconds */
static int l_now (lua_State *L) {
  lua_pushnumber(L, pf_now());
  return 1;
}


void pf_open_loop (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"setlog", l_setlog},
    {"log", l_log},
    {"logfile", l_logfile},
    {"reopenlog", l_reopenlog},
    {"now", l_now},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
}
