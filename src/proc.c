/*
** proc.c: fork and the child-side reset, wait status, kill and signal
** names, process titles.
*/

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <grp.h>
#include <pwd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include "prefork.h"


/* {======================================================
** Signal names
** ======================================================= */

static const struct {
  const char *name;
  int sig;
} signames[] = {
  {"HUP", SIGHUP}, {"INT", SIGINT}, {"QUIT", SIGQUIT}, {"ILL", SIGILL},
  {"TRAP", SIGTRAP}, {"ABRT", SIGABRT}, {"BUS", SIGBUS}, {"FPE", SIGFPE},
  {"KILL", SIGKILL}, {"USR1", SIGUSR1}, {"SEGV", SIGSEGV},
  {"USR2", SIGUSR2}, {"PIPE", SIGPIPE}, {"ALRM", SIGALRM},
  {"TERM", SIGTERM}, {"CHLD", SIGCHLD}, {"CONT", SIGCONT},
  {"STOP", SIGSTOP}, {"TSTP", SIGTSTP}, {"TTIN", SIGTTIN},
  {"TTOU", SIGTTOU}, {"URG", SIGURG}, {"XCPU", SIGXCPU},
  {"XFSZ", SIGXFSZ}, {"VTALRM", SIGVTALRM}, {"PROF", SIGPROF},
  {"WINCH", SIGWINCH}, {"IO", SIGIO}, {"SYS", SIGSYS},
  {NULL, 0}
};


/* "TERM" for SIGTERM; NULL for a signal without a name here */
const char *pf_signame (int sig) {
  int i;
  for (i = 0; signames[i].name != NULL; i++)
    if (signames[i].sig == sig) return signames[i].name;
  return NULL;
}


/* a signal given as "TERM", "SIGTERM" or a number; raises on others */
int pf_signum (lua_State *L, int idx) {
  const char *name;
  int i;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Integer n = luaL_checkinteger(L, idx);
    luaL_argcheck(L, n >= 0 && n < NSIG, idx, "no such signal");
    return (int)n;
  }
  name = luaL_checkstring(L, idx);
  if (strncmp(name, "SIG", 3) == 0) name += 3;
  for (i = 0; signames[i].name != NULL; i++)
    if (strcmp(signames[i].name, name) == 0) return signames[i].sig;
  return luaL_argerror(L, idx,
                       lua_pushfstring(L, "unknown signal '%s'", name));
}

/* }====================================================== */


/* {======================================================
** Wait status
** ======================================================= */

/* Keep the statuses of children that the master's loop reaped for
** nobody, so that prefork.wait still finds them (libev reaps every child
** of the process while a master runs). A small ring: the oldest go. */
#define NREAPED	64

static struct {
  pid_t pid;
  int status;
} reaped[NREAPED];
static unsigned nextreaped = 0;


/* a running master's claim on the statuses of its workers */
static int (*reaphook) (void *ud, pid_t pid, int status) = NULL;
static void *reapud = NULL;

void pf_onreap (int (*hook) (void *, pid_t, int), void *ud) {
  reaphook = hook;
  reapud = ud;
}


void pf_reaped (pid_t pid, int status) {
  reaped[nextreaped % NREAPED].pid = pid;
  reaped[nextreaped % NREAPED].status = status;
  nextreaped++;
}


/* take a kept status: of pid, or of any child when pid <= 0 */
pid_t pf_takereaped (pid_t pid, int *status) {
  int i;
  for (i = 0; i < NREAPED; i++) {
    pid_t p = reaped[i].pid;
    if (p > 0 && (pid <= 0 || p == pid)) {
      *status = reaped[i].status;
      reaped[i].pid = 0;
      return p;
    }
  }
  return 0;
}


/* "exit", code or "signal", number as Lua values [-0, +2, m] */
int pf_pushstatus (lua_State *L, int status) {
  if (WIFEXITED(status)) {
    lua_pushliteral(L, "exit");
    lua_pushinteger(L, WEXITSTATUS(status));
  }
  else if (WIFSIGNALED(status)) {
    lua_pushliteral(L, "signal");
    lua_pushinteger(L, WTERMSIG(status));
  }
  else if (WIFSTOPPED(status)) {
    lua_pushliteral(L, "stopped");
    lua_pushinteger(L, WSTOPSIG(status));
  }
  else {
    lua_pushliteral(L, "continued");
    lua_pushinteger(L, 0);
  }
  return 2;
}


/* prefork.wait([pid [, "nohang"]]) -> pid, "exit"|"signal", code */
static int l_wait (lua_State *L) {
  static const char *const opts[] = {"block", "nohang", NULL};
  pid_t pid = (pid_t)luaL_optinteger(L, 1, -1);
  int nohang = luaL_checkoption(L, 2, "block", opts);
  int status = 0;
  pid_t got = pf_takereaped(pid, &status);
  while (got == 0) {
    got = waitpid(pid, &status, nohang ? WNOHANG : 0);
    if (got < 0 && errno == EINTR) {
      got = 0;
      continue;
    }
    if (got < 0) return pf_fail(L, "wait");
    if (got == 0) {  /* nohang and still running */
      luaL_pushfail(L);
      lua_pushliteral(L, "running");
      return 2;
    }
    /* a worker's status belongs to its master (which learns it now); a
    ** wait for any child goes on for one that is not a worker, without
    ** blocking: the workers may all outlive the hook that waits */
    if (reaphook != NULL && reaphook(reapud, got, status) && pid <= 0) {
      got = 0;
      nohang = 1;
    }
  }
  lua_pushinteger(L, got);
  return 1 + pf_pushstatus(L, status);
}


/* prefork.kill(pid, [signal]) -> true; signal defaults to "TERM" */
static int l_kill (lua_State *L) {
  lua_Integer pid = luaL_checkinteger(L, 1);
  int sig = lua_isnoneornil(L, 2) ? SIGTERM : pf_signum(L, 2);
  luaL_argcheck(L, pid != 0 && pid != -1, 1,
                "0 and -1 would signal this process group or every process");
  luaL_argcheck(L, pid > INT_MIN && pid <= INT_MAX, 1, "not a pid");
  if (kill((pid_t)pid, sig) != 0)
    return pf_fail(L, "kill");
  lua_pushboolean(L, 1);
  return 1;
}


/* prefork.getpid() -> this process's pid */
static int l_getpid (lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}


/* prefork.subreaper([on]) -> true: orphaned descendants become our
** children (PR_SET_CHILD_SUBREAPER), for masters and supervisors that
** must reap what their workers leave behind */
static int l_subreaper (lua_State *L) {
  int on = lua_isnone(L, 1) || lua_toboolean(L, 1);
  if (prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) != 0)
    return pf_fail(L, "prctl");
  lua_pushboolean(L, 1);
  return 1;
}


/* prefork.signame(n) -> "TERM" */
static int l_signame (lua_State *L) {
  const char *name = pf_signame((int)luaL_checkinteger(L, 1));
  if (name == NULL) luaL_pushfail(L);
  else lua_pushstring(L, name);
  return 1;
}

/* }====================================================== */


/* {======================================================
** Fork
** ======================================================= */

/*
** The child starts as a fresh process would after exec: caught signals
** back to their default action (an ignored signal stays ignored, as
** across exec), an empty signal mask, and no copy of the master's loop.
*/
static void childreset (void) {
  struct sigaction sa;
  int sig;
  for (sig = 1; sig < NSIG; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    if (sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_IGN
        && sa.sa_handler != SIG_DFL) {
      sa.sa_handler = SIG_DFL;
      sa.sa_flags = 0;
      sigemptyset(&sa.sa_mask);
      sigaction(sig, &sa, NULL);
    }
  }
  pf_loop_child();
}


/*
** fork(2) with all signals blocked across it, so that a signal sent to
** the new child before its reset cannot run an inherited handler (libev's
** would write into the master's wakeup pipe and lose the signal). Output
** buffered before the fork is flushed first, so it appears once. The
** child leaves with all signals still blocked: it unblocks them (with
** pf_child_run) once its own handlers are in place.
*/
pid_t pf_fork (void) {
  sigset_t all, old;
  pid_t pid;
  int en;
  fflush(NULL);
  sigfillset(&all);
  sigprocmask(SIG_SETMASK, &all, &old);
  pid = fork();
  en = errno;
  if (pid == 0)
    childreset();
  else
    sigprocmask(SIG_SETMASK, &old, NULL);
  errno = en;
  return pid;
}


/* leave a child: its own output flushed, no atexit handlers, no __gc */
void pf_exit (int status) {
  fflush(NULL);
  _exit(status);
}


/*
** In a new child: unblock signals, call the function below the nargs
** arguments, protected, and exit: 0 when it returns, 1 when it raises
** (with the traceback in the log). Never returns into the caller's Lua.
*/
void pf_child_run (lua_State *L, int nargs) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (pf_pcall(L, nargs, 0) != LUA_OK) {
    pf_log(L, "error", "pid %ld failed: %s", (long)getpid(),
           lua_tostring(L, -1));
    pf_exit(1);
  }
  pf_exit(0);
}


/* core.exit([code]): leave this process at once, its stdio flushed,
** with no atexit handler and no __gc (a forked child's way out) */
static int l_exit (lua_State *L) {
  pf_exit((int)luaL_optinteger(L, 1, 0));
  return 0;
}


/* prefork.fork(fn, ...) -> pid; the child runs fn(...) and exits */
static int l_fork (lua_State *L) {
  pid_t pid;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  pid = pf_fork();
  if (pid < 0)
    return pf_fail(L, "fork");
  if (pid == 0)
    pf_child_run(L, lua_gettop(L) - 1);
  lua_pushinteger(L, pid);
  return 1;
}

/* }====================================================== */


/* {======================================================
** The command line, and executing it again (an upgrade)
** ======================================================= */

/* this process's command line as it was started (the titles write over
** it), read at the module's load: NUL-separated words */
static char cmdline[65536];
static size_t cmdlen = 0;
static char exe[4096];


static void savecmdline (void) {
  FILE *f = fopen("/proc/self/cmdline", "re");
  ssize_t n;
  if (f != NULL) {
    cmdlen = fread(cmdline, 1, sizeof(cmdline) - 1, f);
    fclose(f);
  }
  n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  exe[n > 0 ? n : 0] = '\0';
}


/* core.cmdline() -> exe, {argv...}: how this process was started */
static int l_cmdline (lua_State *L) {
  size_t i = 0;
  int k = 0;
  lua_pushstring(L, exe);
  lua_newtable(L);
  while (i < cmdlen) {
    size_t n = strlen(cmdline + i);
    lua_pushlstring(L, cmdline + i, n);
    lua_rawseti(L, -2, ++k);
    i += n + 1;
  }
  return 2;
}


/* the strings of the list at idx, as a NULL-terminated array in a
** userdata (kept on the stack) */
static char **strings (lua_State *L, int idx) {
  int i, n = (int)luaL_len(L, idx);
  char **v = (char **)lua_newuserdatauv(L, sizeof(char *) * ((size_t)n + 1), 0);
  for (i = 0; i < n; i++) {
    lua_geti(L, idx, i + 1);
    v[i] = (char *)(size_t)luaL_checkstring(L, -1);
    lua_pop(L, 1);  /* (the list keeps it) */
  }
  v[n] = NULL;
  return v;
}


/*
** core.exec(path, argv, env, keep) -> pid | fail: a new process that
** executes path with the lists argv and env ("K=V"); the fds in the list
** keep are inherited (all others close on exec). The child starts with
** default signals, none blocked.
*/
static int l_exec (lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char **argv = strings(L, 2), **env = strings(L, 3);
  int i, n = (int)luaL_len(L, 4);
  pid_t pid;
  for (i = 1; i <= n; i++) {  /* (checked before the fork) */
    lua_geti(L, 4, i);
    luaL_checkinteger(L, -1);
    lua_pop(L, 1);
  }
  if ((pid = pf_fork()) == 0) {
    sigset_t none;
    for (i = 1; i <= n; i++) {
      lua_geti(L, 4, i);
      fcntl((int)lua_tointeger(L, -1), F_SETFD, 0);
      lua_pop(L, 1);
    }
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(path, argv, env);
    _exit(127);
  }
  if (pid < 0) return pf_fail(L, "fork");
  lua_pushinteger(L, pid);
  return 1;
}

/* }====================================================== */


/* {======================================================
** Users: whom the workers run as
** ======================================================= */

/* core.getuid() -> the effective uid of this process */
static int l_getuid (lua_State *L) {
  lua_pushinteger(L, geteuid());
  return 1;
}


/* core.ids(user [, group]) -> uid, gid, name | nil, why: the ids of a
** user (a name or a number) and of group (default: the user's own) */
static int l_ids (lua_State *L) {
  const char *user = luaL_checkstring(L, 1), *group = luaL_optstring(L, 2, NULL);
  struct passwd *pw = getpwnam(user);
  struct group *gr;
  char *end;
  unsigned long n = strtoul(user, &end, 10);
  if (pw == NULL && *end == '\0' && end != user) pw = getpwuid((uid_t)n);
  if (pw == NULL)
    return pf_failwith(L, lua_pushfstring(L, "no user '%s'", user), ENOENT);
  lua_pushinteger(L, pw->pw_uid);
  if (group == NULL) lua_pushinteger(L, pw->pw_gid);
  else if ((gr = getgrnam(group)) != NULL) lua_pushinteger(L, gr->gr_gid);
  else if ((n = strtoul(group, &end, 10)), *end == '\0' && end != group)
    lua_pushinteger(L, (lua_Integer)n);
  else
    return pf_failwith(L, lua_pushfstring(L, "no group '%s'", group), ENOENT);
  lua_pushstring(L, pw->pw_name);
  return 3;
}


/* core.chown(path, uid, gid) -> true | fail: a file handed to a user (a
** Unix socket's, the log file, for the workers) */
static int l_chown (lua_State *L) {
  if (chown(luaL_checkstring(L, 1), (uid_t)luaL_checkinteger(L, 2),
            (gid_t)luaL_checkinteger(L, 3)) != 0)
    return pf_fail(L, "chown");
  lua_pushboolean(L, 1);
  return 1;
}


/* become user name (uid, gid), its supplementary groups too: 0, or -1
** with errno and the failing call in *what */
int pf_becomeuser (const char *name, uid_t uid, gid_t gid, const char **what) {
  *what = "initgroups";
  if (initgroups(name, gid) != 0) return -1;
  *what = "setgid";
  if (setgid(gid) != 0) return -1;
  *what = "setuid";
  return setuid(uid);
}

/* }====================================================== */


/* {======================================================
** Process titles
** ======================================================= */

/*
** The title is written over the process's own argv strings, where ps and
** /proc/PID/cmdline read it. When the environment strings follow argv
** (the usual layout), they are copied to the heap first and their space
** joins the title's, as nginx does. The last byte of the argv area is
** then kept non-zero, which tells the kernel to read the title up to its
** first NUL only.
*/
static char *titlebase = NULL;
static size_t titlecap = 0;
static char *argend = NULL;



static int procstat (unsigned long f[4]) {
  char buf[2048];
  const char *p;
  int i;
  ssize_t n;
  FILE *fp = fopen("/proc/self/stat", "r");
  if (fp == NULL) return 0;
  n = (ssize_t)fread(buf, 1, sizeof(buf) - 1, fp);
  fclose(fp);
  if (n <= 0) return 0;
  buf[n] = '\0';
  p = strrchr(buf, ')');  /* the name may hold spaces */
  if (p == NULL) return 0;
  for (i = 2; i < 48 && p != NULL; i++)  /* field 48 is arg_start */
    p = strchr(p + 1, ' ');
  return p != NULL && sscanf(p, " %lu %lu %lu %lu",
                             &f[0], &f[1], &f[2], &f[3]) == 4;
}


static void titleinit (void) {
  unsigned long f[4];  /* arg_start, arg_end, env_start, env_end */
  char *envend;
  int i;
  if (titlebase != NULL || !procstat(f) || f[1] <= f[0]) return;
  /* the kernel's argv must be this program's (under valgrind it is the
  ** tool's): glibc's program_invocation_name is argv[0] */
  if ((char *)f[0] != program_invocation_name) return;
  titlebase = (char *)f[0];
  argend = (char *)f[1];
  envend = argend;
  if (f[2] == f[1] && f[3] > f[2]) {  /* environment right after argv */
    for (i = 0; environ[i] != NULL; i++) {
      char *s = environ[i];
      if (s >= argend && s < (char *)f[3]) {
        char *copy = strdup(s);
        if (copy == NULL) break;
        environ[i] = copy;
        if (s + strlen(s) + 1 > envend) envend = s + strlen(s) + 1;
      }
    }
  }
  titlecap = (size_t)(envend - titlebase);
}


void pf_settitle (const char *title) {
  size_t n = strlen(title);
  char comm[16];
  titleinit();
  snprintf(comm, sizeof(comm), "%s", title);
  prctl(PR_SET_NAME, comm, 0, 0, 0);
  if (titlebase == NULL || titlecap < 2) return;
  if (n > titlecap - 1) n = titlecap - 1;
  memset(titlebase, 0, titlecap);
  memcpy(titlebase, title, n);
  if (titlebase + n + 1 < argend)
    argend[-1] = ' ';  /* kernel: read up to the first NUL */
}


/* a title of several NUL-separated words (an argv, as ps shows one):
** argv[0] reads as the first word again (lua.c's progname is argv[0]) */
void pf_settitlev (const char *const *argv, int argc) {
  size_t used = 0;
  int i;
  titleinit();
  if (argc > 0) {
    char comm[16];
    snprintf(comm, sizeof(comm), "%s", argv[0]);
    prctl(PR_SET_NAME, comm, 0, 0, 0);
  }
  if (titlebase == NULL || titlecap < 2) return;
  memset(titlebase, 0, titlecap);
  for (i = 0; i < argc; i++) {
    size_t n = strlen(argv[i]);
    if (used + n + 1 > (size_t)(argend - titlebase)) break;
    memcpy(titlebase + used, argv[i], n);
    used += n + 1;
  }
}


/* prefork.settitle(title) */
static int l_settitle (lua_State *L) {
  pf_settitle(luaL_checkstring(L, 1));
  return 0;
}

/* }====================================================== */


/* {======================================================
** Copy-on-write, done ahead
** ======================================================= */

#define BUDGET	((size_t)32 << 20)  /* bytes written at most */
#define SMALL	((size_t)1 << 20)  /* mappings up to this size go first */
#define MAXSCANNED	((size_t)4 << 30)  /* bigger mappings are reserves
                                        ** (sanitizers' shadows): left */
#define MAXREGIONS	4096
#define CHUNK	4096  /* pages asked of mincore at once */

/* touch reads and writes what the program never allocated (redzones);
** not inlined where a fault may jump back */
#if defined(__GNUC__)
#define PF_NOSANITIZE	__attribute__((no_sanitize("address"), noinline))
#else
#define PF_NOSANITIZE
#endif

static sigjmp_buf faulted;  /* a page that cannot be written: skip on */
static volatile size_t left;  /* pages that may still be written */


static void onfault (int sig) {
  (void)sig;
  siglongjmp(faulted, 1);
}


/* under valgrind, whose own mappings are in the list (and a write there
** an error) */
static int undervalgrind (void) {
  const char *p = getenv("LD_PRELOAD");
  return p != NULL && strstr(p, "vgpreload") != NULL;
}


/* write the value it holds into each resident page of [lo, hi), while
** the budget lasts */
PF_NOSANITIZE static void touch (char *lo, char *hi, size_t page) {
  static unsigned char in[CHUNK];
  while (lo < hi && left > 0) {
    size_t i, len = (size_t)(hi - lo) < CHUNK * page ? (size_t)(hi - lo)
                                                    : CHUNK * page;
    if (mincore(lo, len, in) != 0) return;
    for (i = 0; i < (len + page - 1) / page && left > 0; i++) {
      if (in[i] & 1) {
        volatile char *p = lo + i * page;
        *p = *p;
        left--;
      }
    }
    lo += len;
  }
}


/* touch, ended by a page that cannot be written */
static void guarded (char *lo, char *hi, size_t page) {
  if (sigsetjmp(faulted, 1) == 0)
    touch(lo, hi, page);
}


/* the process's private writable mappings, up to max */
static int regions (char *(*r)[2], int max) {
  char line[512];
  int n = 0;
  FILE *f = fopen("/proc/self/maps", "re");
  if (f == NULL) return 0;
  while (n < max && fgets(line, sizeof(line), f) != NULL) {
    unsigned long lo, hi;
    char perms[5];
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) == 3
        && strcmp(perms, "rw-p") == 0 && hi - lo <= MAXSCANNED) {
      r[n][0] = (char *)lo;
      r[n++][1] = (char *)hi;
    }
  }
  fclose(f);
  return n;
}


/*
** Write the resident pages of the process's private writable mappings
** (the value each holds), the small mappings first (data of libraries,
** the stack), up to BUDGET: a child forked ahead takes these
** copy-on-write faults now, not when it has work. A page that cannot be
** written (a protection key, say) ends its mapping's turn. Returns the
** pages written.
*/
size_t pf_prefault (void) {
  static char *r[MAXREGIONS][2];
  struct sigaction sa, oldsegv, oldbus;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  int n, i, pass;
  if (undervalgrind() || (n = regions(r, MAXREGIONS)) == 0) return 0;
  left = BUDGET / page;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = onfault;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &oldsegv);
  sigaction(SIGBUS, &sa, &oldbus);
  for (pass = 0; pass < 2; pass++) {
    for (i = 0; i < n; i++) {
      int small = (size_t)(r[i][1] - r[i][0]) <= SMALL;
      if (small == (pass == 0)) guarded(r[i][0], r[i][1], page);
    }
  }
  sigaction(SIGSEGV, &oldsegv, NULL);
  sigaction(SIGBUS, &oldbus, NULL);
  return BUDGET / page - left;
}

/* }====================================================== */


void pf_open_proc (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"fork", l_fork},
    {"exit", l_exit},
    {"wait", l_wait},
    {"kill", l_kill},
    {"signame", l_signame},
    {"getpid", l_getpid},
    {"subreaper", l_subreaper},
    {"settitle", l_settitle},
    {"cmdline", l_cmdline},
    {"ids", l_ids},
    {"chown", l_chown},
    {"getuid", l_getuid},
    {"exec", l_exec},
    {NULL, NULL}
  };
  if (cmdlen == 0) savecmdline();
  luaL_setfuncs(L, funcs, 0);
}
