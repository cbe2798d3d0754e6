/*
** interp.c: the Lua entry of the prefork-interp server (chiark-utils'
** protocol, wire-compatible with Debian's /usr/bin/prefork-interp 7.0.0):
** core.interp_serve, which turns the initialised script into the server
** (interp_server.c) and returns in each executor (interp_exec.c), and
** the wire's parsers for the specs (wire.c).
*/

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/mman.h>

#include "interp_state.h"


/* {======================================================
** Options
** ======================================================= */

static int syslogfacility (const char *name) {
  static const struct { const char *n; int f; } fac[] = {
    {"LOG_USER", LOG_USER}, {"LOG_DAEMON", LOG_DAEMON},
    {"LOG_LOCAL0", LOG_LOCAL0}, {"LOG_LOCAL1", LOG_LOCAL1},
    {"LOG_LOCAL2", LOG_LOCAL2}, {"LOG_LOCAL3", LOG_LOCAL3},
    {"LOG_LOCAL4", LOG_LOCAL4}, {"LOG_LOCAL5", LOG_LOCAL5},
    {"LOG_LOCAL6", LOG_LOCAL6}, {"LOG_LOCAL7", LOG_LOCAL7},
    {"LOG_MAIL", LOG_MAIL}, {"LOG_AUTH", LOG_AUTH}, {"LOG_CRON", LOG_CRON},
    {"LOG_LPR", LOG_LPR}, {"LOG_NEWS", LOG_NEWS}, {"LOG_UUCP", LOG_UUCP},
    {"LOG_SYSLOG", LOG_SYSLOG}, {"LOG_AUTHPRIV", LOG_AUTHPRIV},
    {NULL, 0}
  };
  int i;
  for (i = 0; fac[i].n != NULL; i++)
    if (strcasecmp(fac[i].n, name) == 0
        || strcasecmp(fac[i].n + 4, name) == 0)
      return fac[i].f;
  return -1;
}


static void *checkalloc (lua_State *L, size_t n, size_t size) {
  void *p = calloc(n + 1, size);
  if (p == NULL) luaL_error(L, "not enough memory");
  return p;
}


/* the list opts[field] of strings, copied (for the server's life) */
static char **checkstrings (lua_State *L, int t, const char *field, int *n) {
  char **v;
  int i;
  lua_getfield(L, t, field);
  luaL_checktype(L, -1, LUA_TTABLE);
  *n = (int)luaL_len(L, -1);
  v = (char **)checkalloc(L, (size_t)*n, sizeof(char *));
  for (i = 0; i < *n; i++) {
    const char *s;
    lua_geti(L, -1, i + 1);
    if ((s = lua_tostring(L, -1)) == NULL)
      luaL_error(L, "interp: %s[%d] is not a string", field, i + 1);
    if ((v[i] = strdup(s)) == NULL) luaL_error(L, "not enough memory");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return v;
}


static int cmpint (const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}


/* opts.keep, sorted: open fds from 3 up (a closed one would pass on
** whatever the server opens there later) */
static int *checkkeep (lua_State *L, int t, int *n) {
  int i, *v;
  lua_getfield(L, t, "keep");
  luaL_checktype(L, -1, LUA_TTABLE);
  *n = (int)luaL_len(L, -1);
  v = (int *)checkalloc(L, (size_t)*n, sizeof(int));
  for (i = 0; i < *n; i++) {
    lua_geti(L, -1, i + 1);
    v[i] = (int)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  qsort(v, (size_t)*n, sizeof(int), cmpint);
  for (i = 0; i < *n; i++)
    if (v[i] < 3 || fcntl(v[i], F_GETFD) < 0)
      luaL_error(L, "keep_fds: fd %d is not open", v[i]);
  return v;
}


static double optnum (lua_State *L, int t, const char *field, double def) {
  double v;
  lua_getfield(L, t, field);
  v = lua_isnil(L, -1) ? def : (double)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}


/* opts[field] as a string kept for the server's life, or NULL */
static const char *optstring (lua_State *L, int t, const char *field) {
  const char *s = NULL;
  lua_getfield(L, t, field);
  if (lua_isstring(L, -1) && (s = strdup(lua_tostring(L, -1))) == NULL)
    luaL_error(L, "not enough memory");
  lua_pop(L, 1);
  return s;
}


/* the log: syslog with opts.log_facility ("" for none) and opts.ident */
static void checklog (lua_State *L, int t, pf_iopts *o) {
  static char ident[512];
  const char *fac;
  int facility = LOG_USER;
  lua_getfield(L, t, "log_facility");
  fac = luaL_optstring(L, -1, "LOG_USER");
  if (*fac != '\0' && (facility = syslogfacility(fac)) < 0)
    luaL_error(L, "interp: unknown log_facility '%s'", fac);
  o->syslog = *fac != '\0';
  lua_getfield(L, t, "ident");
  snprintf(ident, sizeof(ident), "%s",
           luaL_optstring(L, -1, "prefork-interp"));
  if (o->syslog) openlog(ident, LOG_NDELAY | LOG_PID, facility);
  lua_pop(L, 2);
}


/* PREFORK_INTERP (argument 1): well formed, its fds open */
static void checkenv (lua_State *L, pf_ienv *e) {
  const char *err = pf_ienv_parse(luaL_checkstring(L, 1), e);
  int i;
  if (err != NULL)
    luaL_error(L, "PREFORK_INTERP is malformed: %s", err);
  for (i = 0; i < 4; i++)
    if (fcntl(e->fd[i], F_GETFD) < 0)
      luaL_error(L, "PREFORK_INTERP: fd %d: %s", e->fd[i], strerror(errno));
}


/* every option of the table at t (checked by prefork.interp) */
static void checkopts (lua_State *L, int t, pf_iopts *o) {
  checklog(L, t, o);
  o->files = checkstrings(L, t, "files", &o->nfiles);
  o->keep = checkkeep(L, t, &o->nkeep);
  o->max_servers = (long)optnum(L, t, "max_servers", 4);
  o->idle_timeout = optnum(L, t, "idle_timeout", 1e6);
  o->max_errors = (long)optnum(L, t, "max_errors", 100);
  o->servertitle = optstring(L, t, "servertitle");
  o->sparetitle = optstring(L, t, "sparetitle");
  o->makertitle = optstring(L, t, "makertitle");
}

/* }====================================================== */


/* {======================================================
** core.interp_serve
** ======================================================= */

/*
** Huge pages for the heap. The server's heap is what every fork copies
** the page tables of and every exit takes apart again: 5000 entries for
** 20 MB, a millisecond each way on some virtual machines. Collapsed into
** transparent huge pages (MADV_COLLAPSE, Linux 6.1) it is 10 entries; a
** write to a shared huge page splits only that one (4 KiB copied). Done
** once, when the server starts (tens of ms for 20 MB), on the private
** anonymous mappings (the malloc heap and its mmaps) of 2 MiB and more.
** A kernel without it (EINVAL) or with THP off: nothing happens.
*/
#if !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE	25
#endif

/* the start and end of a heap mapping in a line of /proc/self/maps */
static int heapmap (const char *line, unsigned long *a, unsigned long *b) {
  unsigned long off, ino;
  char perm[8], dev[16];
  int n = 0;
  if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", a, b, perm, &off, dev,
             &ino, &n) < 6
      || strncmp(perm, "rw-p", 4) != 0 || ino != 0)
    return 0;
  return line[n] == '\n' || line[n] == '\0'
         || strncmp(line + n, "[heap]", 6) == 0;  /* not the stack... */
}


static void hugeheap (void) {
  const unsigned long huge = 2UL << 20;
  char line[512];
  int whole = 1;  /* line starts a line of the file */
  FILE *f = fopen("/proc/self/maps", "re");
  if (f == NULL) return;
  while (fgets(line, sizeof(line), f) != NULL) {
    unsigned long a, b;
    int start = whole;
    whole = strchr(line, '\n') != NULL;  /* (else the next one goes on) */
    if (!start || !heapmap(line, &a, &b)) continue;
    a = (a + huge - 1) & ~(huge - 1);
    b &= ~(huge - 1);
    if (b > a && madvise((void *)a, b - a, MADV_HUGEPAGE) == 0)
      (void)madvise((void *)a, b - a, MADV_COLLAPSE);
  }
  fclose(f);
}


/*
** core.interp_oneheap(): malloc's large blocks in its one heap from now
** on, not in mappings of their own (prefork.interp asks when it is
** loaded, before the script's initialisation). A heap in one piece is
** what settle can turn into huge pages: for 30 MB of Lua data, 27 MB of
** huge pages instead of 22, and a spare's fork copies a third fewer page
** table entries. (Freed large blocks then stay in the heap: a server's
** data mostly lives as long as it does.)
*/
static int l_oneheap (lua_State *L) {
  (void)L;
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  return 0;
}


/* the heap every executor shares: a full collection now leaves the
** collector paused until the heap doubles (an executor's own allocations
** then start no cycle that would write to, and copy, every page it
** shares with the server); then huge pages */
static void settle (lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT);
  hugeheap();
}


/* the executor's call: its argv as a list */
static void pushargv (lua_State *L, const pf_ijob *j) {
  int i;
  lua_createtable(L, j->r.nargv, 0);
  for (i = 0; i < j->r.nargv; i++) {
    lua_pushstring(L, j->r.argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
}


/*
** core.interp_serve(envvalue, opts) with opts checked by prefork.interp:
** {files = {...}, keep = {fd...}, max_servers, idle_timeout, max_errors,
** log_facility, ident, servertitle, sparetitle, makertitle}. Returns only
** in an executor, once per call: the request's argv as a list. The
** server exits from here.
*/
static int l_serve (lua_State *L) {
  pf_iopts o;
  memset(&o, 0, sizeof(o));
  checkenv(L, &o.env);
  luaL_checktype(L, 2, LUA_TTABLE);
  checkopts(L, 2, &o);
  pf_iserver_start(L, &o);
  settle(L);
  pushargv(L, pf_iserver_run());
  return 1;
}

/* }====================================================== */


/* {======================================================
** The wire, for the specs
** ======================================================= */

/* core.interp_parseenv(s) -> {sec, nsec, fds = {...}} | nil, err */
static int l_parseenv (lua_State *L) {
  pf_ienv e;
  const char *err = pf_ienv_parse(luaL_checkstring(L, 1), &e);
  int i;
  if (err != NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)e.sec);
  lua_setfield(L, -2, "sec");
  lua_pushinteger(L, (lua_Integer)e.nsec);
  lua_setfield(L, -2, "nsec");
  lua_createtable(L, 4, 0);
  for (i = 0; i < 4; i++) {
    lua_pushinteger(L, e.fd[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "fds");
  return 1;
}


static void pushlist (lua_State *L, char **v, int n) {
  int i;
  lua_createtable(L, n, 0);
  for (i = 0; i < n; i++) {
    lua_pushstring(L, v[i]);
    lua_rawseti(L, -2, i + 1);
  }
}


/* core.interp_parsereq(s) -> env list, argv list | nil, err */
static int l_parsereq (lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  pf_req r;
  const char *err;
  char *buf = (char *)lua_newuserdatauv(L, len + 1, 0);  /* (freed by GC) */
  memcpy(buf, s, len);
  if ((err = pf_req_parse(buf, len, &r)) != NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  pushlist(L, r.env, r.nenv);
  pushlist(L, r.argv, r.nargv);
  free(r.env);
  return 2;
}


/* core.interp_sendfd(sock, fd) -> true | fail: one byte with one fd, raw
** (unframed), as the prefork-interp client sends fds 0, 1 and 2 */
static int l_sendfd (lua_State *L) {
  int sock = pf_tofd(L, 1), fd = pf_tofd(L, 2);
  if (!pf_sendfd(sock, fd)) return pf_fail(L, "sendmsg");
  lua_pushboolean(L, 1);
  return 1;
}


/* core.interp_greeting() -> the bytes the server greets with */
static int l_greeting (lua_State *L) {
  unsigned char g[PF_GREETLEN];
  size_t n = pf_greet_encode(g);
  lua_pushlstring(L, (const char *)g, n);
  return 1;
}


void pf_open_interp (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"interp_serve", l_serve},
    {"interp_parseenv", l_parseenv},
    {"interp_parsereq", l_parsereq},
    {"interp_greeting", l_greeting},
    {"interp_sendfd", l_sendfd},
    {"interp_sentinel", pf_iexec_sentinel},
    {"interp_oneheap", l_oneheap},
    {"interp_setexit", pf_iexec_setexit},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, PF_MAXREQ);
  lua_setfield(L, -2, "interp_maxreq");
}

/* }====================================================== */
