/*
** lua-prefork.c: the client command (wrapper) of prefork-interp for Lua.
** Speaks the protocol of chiark-utils' prefork-interp 7.0.0 (described in
** /work/shared/reference/prefork-interp.md): same options, run directory,
** ident hash, lock, sockets and wire, so that this wrapper and Debian's
** /usr/bin/prefork-interp reach each other's servers.
**
**   lua-prefork [OPTIONS] SCRIPT [ARGS]          is exactly -U LUA (the Lua
**                                                this was built for)
**   lua-prefork -U [OPTIONS] INTERP SCRIPT [ARGS]
**   #!/usr/bin/lua-prefork -U,INTERP[,FLAG...]   the combined first word
**
** Beyond Debian's wrapper:
**  - Interpreter flags in the combined word: "-U,lua5.4,-W" runs
**    "lua5.4 -W SCRIPT ARGS". Each flag enters the ident as an item 'f'
**    FLAG NUL between the 'i' INTERP and the 's' SCRIPT items (so without
**    flags the ident is Debian's), and the server's argv is INTERP,
**    FLAGS..., SCRIPT, ARGS (the same as the executor argv).
**  - Signals: while waiting for the status, INT, TERM, HUP, QUIT, USR1,
**    USR2 and WINCH (those the caller did not leave ignored) are forwarded
**    as one byte each, the signal number, on the call connection. A
**    lua-prefork server signals the executor's process group; a Perl
**    server sees the connection readable and sends SIGINT (the documented
**    degradation).
**  - A call that died of signal N makes this process die of N too (with
**    core dumps of our own disabled); if N does not kill (e.g. WINCH), it
**    exits 128+N.
**  - The run directory must be a directory (not a symlink) owned by us,
**    mode & 077 == 0, or we refuse it.
**  - SETUP and the watcher get only the fds the protocol names.
**  - The greeting's extra data may be at most MAXXLEN bytes; its length is
**    read big-endian like every other length (servers send 0).
**  - Preclean removes only the oldest idents beyond MAXSOCKETS.
** Errors exit 127 with "lua-prefork: MSG[: strerror]"; bad usage 255.
*/

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#include <nettle/sha2.h>

#ifndef LUA_PREFORK_LUA
#define LUA_PREFORK_LUA "lua5.4"
#endif

#define PROGNAME "lua-prefork"
#define RUNNAME "prefork-interp"  /* shared with Debian's wrapper */
#define MINHEXHASH 33
#define MAXSOCKETS 100   /* idents kept in the run dir by preclean */
#define MAXPIECES 3      /* option pieces before INTERP in a combined word */
#define MAXXLEN 65536    /* greeting extra data we accept */

#define GREET_OK 0       /* complete: *want bytes are the whole greeting */
#define GREET_MORE 1     /* *want bytes are needed */
#define GREET_BADMAGIC 2
#define GREET_TOOBIG 3

static const unsigned char magic[4] = {'P', 'F', 'I', '\n'};


/*
** {======================================================
** Greeting: "PFI\n", a big-endian u32 XLEN, XLEN bytes of extra data.
** greeting_parse looks at the len bytes received so far.
** =======================================================
*/

static uint32_t get_be32 (const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
         (uint32_t)p[2] << 8 | (uint32_t)p[3];
}


static int greeting_parse (const unsigned char *buf, size_t len,
                           size_t *want) {
  uint32_t xlen;
  if (memcmp(buf, magic, len < 4 ? len : 4) != 0) return GREET_BADMAGIC;
  if (len < 8) { *want = 8; return GREET_MORE; }
  xlen = get_be32(buf + 4);
  if (xlen > MAXXLEN) return GREET_TOOBIG;
  *want = 8 + (size_t)xlen;
  return len >= *want ? GREET_OK : GREET_MORE;
}

/* }====================================================== */


#ifndef LUA_PREFORK_NO_MAIN  /* { (the fuzz target includes the parser only) */

/*
** {======================================================
** Messages
** =======================================================
*/

static void vmsg (int err, const char *fmt, va_list ap) {
  fprintf(stderr, "%s: ", PROGNAME);
  vfprintf(stderr, fmt, ap);
  if (err) fprintf(stderr, ": %s", strerror(err));
  fputc('\n', stderr);
}


static void die (const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vmsg(0, fmt, ap);
  va_end(ap);
  exit(127);
}


static void diee (const char *fmt, ...) {
  int err = errno;
  va_list ap;
  va_start(ap, fmt);
  vmsg(err, fmt, ap);
  va_end(ap);
  exit(127);
}


static void warning (const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s: warning: ", PROGNAME);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}


static void usage (FILE *f) {
  fprintf(f, "usage: " PROGNAME " [OPTIONS] SCRIPT [ARGS]"
             "            (runs SCRIPT with " LUA_PREFORK_LUA ")\n"
             "       " PROGNAME " -U [OPTIONS] INTERP SCRIPT [ARGS]\n"
             "       #!/usr/bin/" PROGNAME " -U,INTERP[,FLAG...]\n"
             "options: -f (fresh server)  --kill  -E VAR  -G STRING  "
             "-g IDENT  --help\n");
}


static void badusage (const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  usage(stderr);
  exit(255);
}


static void *xmalloc (size_t n) {
  void *p = malloc(n ? n : 1);
  if (p == NULL) die("out of memory");
  return p;
}


static char *xasprintf (const char *fmt, ...) {
  char *s;
  va_list ap;
  va_start(ap, fmt);
  if (vasprintf(&s, fmt, ap) < 0) die("out of memory");
  va_end(ap);
  return s;
}

/* }====================================================== */


/*
** {======================================================
** Options and ident
** =======================================================
*/

static struct sha256_ctx identsc;
static int unlaundered, mode;  /* mode: 0, 'f' or 'k' */
static char *interp, *script;  /* char *: they end in execvp's argv */
static const char *ident;
static char **iflags;  /* interpreter flags (combined word) */
static int niflags;
static char **exec_argv;
static char lua_name[] = LUA_PREFORK_LUA;
static char *run_base, *socket_path, *lock_path;
static struct sockaddr_un sockaddr;
static struct stat initial_stab;


static void ident_key (char key) {
  sha256_update(&identsc, 1, (const uint8_t *)&key);
}


static void ident_obj (char key, const void *p, size_t n) {
  ident_key(key);
  sha256_update(&identsc, n, (const uint8_t *)p);
}


static void ident_string (char key, const char *s) {
  ident_obj(key, s, strlen(s) + 1);
}


static void ident_stat (const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) diee("failed to stat %s", path);
  ident_obj(path[0], &st.st_dev, sizeof(st.st_dev));
  ident_obj('i', &st.st_ino, sizeof(st.st_ino));
}


/* items 1 to 7 of the hash: they come before the -E/-G items */
static void ident_init (void) {
  struct utsname uts;
  size_t utslen = sizeof(uts);
  memset(&uts, 0, sizeof(uts));
  if (uname(&uts) != 0) diee("uname failed!");
  sha256_init(&identsc);
  ident_key(1);
  ident_obj('u', &utslen, sizeof(utslen));
  ident_obj('u', &uts, sizeof(uts));
  ident_stat(".");
  ident_stat("/");
}


static void ident_env (const char *name) {
  const char *v = getenv(name);
  ident_string('E', name);
  if (v) ident_string('v', v);
  else ident_key(0);
}


/* one option with its value; a value comes attached ("-EX", "-E=X") or
   from the next word; returns how many words were used after *w */
static int option_value (char o, const char *rest, const char *next) {
  const char *v = rest;
  int used = 0;
  if (*v == '=') v++;
  else if (*v == '\0') {
    if (next == NULL) badusage("-%c option takes a value", o);
    v = next;
    used = 1;
  }
  if (o == 'E') ident_env(v);
  else if (o == 'G') ident_string('G', v);
  else ident = v;
  return used;
}


static void long_option (const char *w) {
  const char *eq = strchr(w, '=');
  size_t n = eq ? (size_t)(eq - w) : strlen(w);
  if (n == 4 && strncmp(w, "kill", 4) == 0) {
    if (eq) badusage("--kill option does not take a value");
    mode = 'k';
  }
  else if (n == 4 && strncmp(w, "help", 4) == 0) {
    if (eq) badusage("--help option does not take a value");
    usage(stdout);
    if (fflush(stdout) != 0 || ferror(stdout))
      diee("write usage message to stdout");
    exit(0);
  }
  else badusage("unknown option --%s", w);
}


/* getopt-like over a NULL-terminated list; returns the first non-option */
static char **parse_options (char **w) {
  for (; *w && (*w)[0] == '-' && (*w)[1] != '\0'; w++) {
    const char *p = *w + 1;
    if (*p == '-') {
      if (p[1] == '\0') return w + 1;  /* "--" */
      long_option(p + 1);
      continue;
    }
    for (; *p; p++) {
      if (*p == 'U') unlaundered = 1;
      else if (*p == 'f') mode = 'f';
      else if (*p == 'E' || *p == 'G' || *p == 'g') {
        w += option_value(*p, p + 1, w[1]);
        break;
      }
      else badusage("unknown option -%c", *p);
    }
  }
  return w;
}


/* cut a combined word at its first space, or else its first comma;
   returns the rest or NULL */
static char *cut (char *s) {
  char *d = strchr(s, ' ');
  if (d == NULL) d = strchr(s, ',');
  if (d == NULL) return NULL;
  *d = '\0';
  return d + 1;
}


/* the #! form: argv[1] holds options (at most MAXPIECES pieces), then
   maybe INTERP and its flags */
static void parse_combined (const char *word) {
  char *pieces[MAXPIECES + 1];
  int n = 0;
  char *s = xasprintf("%s", word);  /* argv stays as it was, for ps */
  char *rest = s;
  while (rest && rest[0] == '-') {
    if (n >= MAXPIECES) die("too many options in combined arg");
    pieces[n++] = rest;
    rest = cut(rest);
  }
  pieces[n] = NULL;
  if (*parse_options(pieces) != NULL)
    badusage("unexpected argument in combined arg");
  if (!unlaundered) {
    if (rest && *rest)
      badusage("combined arg names an interpreter but lacks -U");
    return;
  }
  if (rest == NULL || *rest == '\0')
    badusage("combined arg lacks <interpreter>");
  interp = rest;
  rest = cut(rest);
  iflags = (char **)xmalloc((strlen(word) + 1) * sizeof(char *));
  while (rest) {
    char *next = cut(rest);
    if (*rest) iflags[niflags++] = rest;
    rest = next;
  }
}


/* sets interp, iflags, script and exec_argv; returns nothing */
static void parse_args (char **argv) {
  char **w = argv + 1;
  char **out;
  int n;
  ident_init();
  if (w[0] && w[0][0] == '-' && (strchr(w[0], ' ') || strchr(w[0], ','))) {
    parse_combined(w[0]);
    w++;
    if (*w == NULL)
      badusage("no script argument (expected after combined #! options)");
  }
  else {
    w = parse_options(w);
    if (unlaundered) {
      if (*w == NULL) badusage("need interpreter argument");
      interp = *w++;
    }
  }
  if (!unlaundered) {
    if (*w == NULL) badusage("need script argument");
    interp = lua_name;
  }
  if (*w) script = *w++;
  for (n = 0; w[n]; n++) ;
  exec_argv = out = (char **)xmalloc((size_t)(n + niflags + 3)
                                           * sizeof(char *));
  *out++ = interp;
  if (niflags > 0) memcpy(out, iflags, (size_t)niflags * sizeof(char *));
  out += niflags;
  if (script) *out++ = script;
  memcpy(out, w, (size_t)(n + 1) * sizeof(char *));
}

/* }====================================================== */


/*
** {======================================================
** Run directory, socket path, lock
** =======================================================
*/

static int var_run_ok (uid_t us) {
  struct stat st;
  char dir[64];
  snprintf(dir, sizeof(dir), "/var/run/user/%lu", (unsigned long)us);
  if (lstat(dir, &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR || errno == EACCES ||
        errno == EPERM) return 0;
    diee("stat /var/run/user/UID");
  }
  if (!S_ISDIR(st.st_mode))
    warning("%s not a directory, falling back to ~", dir);
  else if (st.st_uid != us)
    warning("%s not owned by uid %lu, falling back to ~", dir,
            (unsigned long)us);
  else if (st.st_mode & 077)
    warning("%s writeable by group or other, falling back to ~", dir);
  else run_base = xasprintf("%s/" RUNNAME, dir);
  return run_base != NULL;
}


/* refuses a run dir that is not ours alone */
static void check_run_base (uid_t us) {
  struct stat st;
  if (lstat(run_base, &st) != 0) diee("run directory %s", run_base);
  if (!S_ISDIR(st.st_mode))
    die("run directory %s is not a directory", run_base);
  if (st.st_uid != us)
    die("run directory %s is not owned by uid %lu", run_base,
        (unsigned long)us);
  if (st.st_mode & 077)
    die("run directory %s is accessible by group or other (mode %03o)",
        run_base, (unsigned)(st.st_mode & 0777));
}


static void make_run_base (uid_t us, const char *parent) {
  if (mkdir(run_base, 0700) != 0) {
    if (errno == ENOENT && parent) {
      if (mkdir(parent, 0700) != 0 && errno != EEXIST)
        diee("mkdir %s (since %s was ENOENT)", parent, run_base);
      if (mkdir(run_base, 0700) != 0 && errno != EEXIST)
        diee("mkdir %s", run_base);
    }
    else if (errno != EEXIST) diee("mkdir %s", run_base);
  }
  check_run_base(us);
}


/*
** The home directory of uid, as getpwuid gives it for a local user, but
** read from /etc/passwd itself (fgetpwent): the command is linked
** statically, without NSS. A user from a directory service (not in
** /etc/passwd) gets $HOME.
*/
static char *home_of (uid_t us) {
  FILE *f = fopen("/etc/passwd", "re");
  const char *home;
  if (f != NULL) {
    struct passwd *pw;
    while ((pw = fgetpwent(f)) != NULL) {
      if (pw->pw_uid == us) {
        char *h = xasprintf("%s", pw->pw_dir);
        fclose(f);
        return h;
      }
    }
    fclose(f);
  }
  home = getenv("HOME");
  if (home == NULL || home[0] != '/')
    die("uid %lu is not in /etc/passwd and $HOME is not set",
        (unsigned long)us);
  return xasprintf("%s", home);
}


static void find_socket_path (void) {
  uid_t us = getuid();
  char *parent = NULL;
  int maxident;
  if (!var_run_ok(us)) {
    char *home = home_of(us);
    struct utsname uts;
    char *dot;
    if (uname(&uts) != 0) diee("uname(2)");
    if ((dot = strchr(uts.nodename, '.')) != NULL) *dot = '\0';
    uts.nodename[32] = '\0';
    parent = xasprintf("%s/." RUNNAME, home);
    free(home);
    run_base = xasprintf("%s/%s", parent, uts.nodename);
  }
  maxident = (int)sizeof(sockaddr.sun_path) - (int)strlen(run_base) - 12;
  if (ident == NULL) {
    int len = maxident > 64 ? 64 : maxident, i;
    unsigned char h[SHA256_DIGEST_SIZE];
    char *hex;
    if (maxident < MINHEXHASH)
      die("base directory `%s' leaves only %d characters for id hash"
          " which is too little (<%d)", run_base, maxident, MINHEXHASH);
    ident_string('i', interp);
    for (i = 0; i < niflags; i++) ident_string('f', iflags[i]);
    if (script) ident_string('s', script);
    sha256_digest(&identsc, sizeof(h), h);
    hex = (char *)xmalloc((size_t)len + 2);
    for (i = 0; i < len; i += 2) sprintf(hex + i, "%02x", h[i / 2]);
    hex[len] = '\0';
    ident = hex;
  }
  if ((int)strlen(ident) > maxident)
    die("base directory `%s' plus ident `%s' too long (with spare)"
        " for socket (max ident %d)", run_base, ident, maxident);
  make_run_base(us, parent);
  free(parent);
  socket_path = xasprintf("%s/s%s", run_base, ident);
  lock_path = xasprintf("%s/l%s", run_base, ident);
  memset(&sockaddr, 0, sizeof(sockaddr));
  sockaddr.sun_family = AF_UNIX;
  strcpy(sockaddr.sun_path, socket_path);
}


static int same_inode (const struct stat *a, const struct stat *b) {
  return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}


/* take the lock at path; survives the file being unlinked meanwhile */
static int flock_file (const char *path) {
  for (;;) {
    struct stat sfd, spath;
    int fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) diee("create lock (%s)", path);
    while (flock(fd, LOCK_EX) != 0)
      if (errno != EINTR) diee("lock lock (%s)", path);
    if (fstat(fd, &sfd) != 0) diee("fstat locked lock");
    if (stat(path, &spath) == 0) {
      if (same_inode(&sfd, &spath)) return fd;
    }
    else if (errno != ENOENT) diee("re-stat locked lock (%s)", path);
    close(fd);
  }
}

/* }====================================================== */


/*
** {======================================================
** Preclean: beyond MAXSOCKETS idents, remove the least recently used
** =======================================================
*/

typedef struct Entry { char *name; time_t atime; } Entry;


static int cmp_name (const void *a, const void *b) {
  return strcmp(((const Entry *)a)->name, ((const Entry *)b)->name);
}


static int cmp_atime (const void *a, const void *b) {
  time_t x = ((const Entry *)a)->atime, y = ((const Entry *)b)->atime;
  return (x > y) - (x < y);
}


static time_t socket_atime (const char *name) {
  struct stat st;
  char *s = xasprintf("%s/s%s", run_base, name);
  int r = lstat(s, &st);
  if (r != 0 && errno != ENOENT) diee("pre-cleanup: stat socket (%s)", s);
  free(s);
  return r == 0 ? st.st_atime : 0;
}


static void preclean_one (const Entry *e) {
  char *l = xasprintf("%s/l%s", run_base, e->name);
  char *s = xasprintf("%s/s%s", run_base, e->name);
  int fd = flock_file(l);
  if (socket_atime(e->name) == e->atime) {  /* else raced: leave it */
    if (unlink(s) != 0 && errno != ENOENT)
      diee("preclean: delete stale (%s)", s);
    if (unlink(l) != 0) diee("preclean: delete stale lock (%s)", l);
  }
  close(fd);
  free(l);
  free(s);
}


static void preclean (void) {
  DIR *d = opendir(run_base);
  Entry *e = NULL;
  size_t n = 0, cap = 0, i, k;
  struct dirent *de;
  if (d == NULL) {
    if (errno == ENOENT) return;
    diee("pre-cleanup: open run dir (%s)", run_base);
  }
  while ((errno = 0, de = readdir(d)) != NULL) {
    if (de->d_name[0] != 'l' && de->d_name[0] != 's') continue;
    if (n == cap) {
      cap = cap * 2 + 16;
      e = (Entry *)realloc(e, cap * sizeof(Entry));
      if (e == NULL) die("out of memory");
    }
    e[n].name = xasprintf("%s", de->d_name + 1);
    e[n].atime = socket_atime(e[n].name);
    n++;
  }
  if (errno) diee("pre-cleanup: read run dir (%s)", run_base);
  closedir(d);
  if (n > 0) qsort(e, n, sizeof(Entry), cmp_name);
  for (i = k = 0; i < n; i++) {  /* dedupe */
    if (k > 0 && strcmp(e[i].name, e[k - 1].name) == 0) free(e[i].name);
    else e[k++] = e[i];
  }
  if (k > MAXSOCKETS) {
    qsort(e, k, sizeof(Entry), cmp_atime);
    for (i = 0; i < k - MAXSOCKETS; i++) preclean_one(&e[i]);
  }
  for (i = 0; i < k; i++) free(e[i].name);
  free(e);
}

/* }====================================================== */


/*
** {======================================================
** I/O on the call socket
** =======================================================
*/

static void writen (int fd, const void *buf, size_t n, const char *what) {
  while (n > 0) {
    ssize_t r = send(fd, buf, n, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      diee("write %s", what);
    }
    buf = (const char *)buf + r;
    n -= (size_t)r;
  }
}


/* returns 0 when the peer went away before the magic (stale); a broken
   greeting after that is fatal */
static int read_greeting (int fd) {
  static unsigned char buf[8 + MAXXLEN];
  size_t have = 0, want = 8;
  int st = GREET_MORE;
  do {
    ssize_t r = read(fd, buf + have, want - have);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != ECONNRESET)
      diee("read() on monitor call socket (greeting)");
    if (r <= 0) {  /* EOF */
      if (have < 4) return 0;
      die("monitor process quit unexpectedly (in the greeting)");
    }
    have += (size_t)r;
    st = greeting_parse(buf, have, &want);
    if (st == GREET_BADMAGIC)
      die("got unexpected protocol magic 0x%02x%02x%02x%02x",
          buf[0], have > 1 ? buf[1] : 0, have > 2 ? buf[2] : 0,
          have > 3 ? buf[3] : 0);
    if (st == GREET_TOOBIG)
      die("greeting extra data of %lu bytes is over the limit of %d",
          (unsigned long)get_be32(buf + 4), MAXXLEN);
  } while (st != GREET_OK);
  return 1;
}


/* returns a connected call socket with the greeting read, or -1 */
static int connect_existing (void) {
  int fd;
  if (mode != 0) return -1;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) diee("socket() for client");
  if (connect(fd, (const struct sockaddr *)&sockaddr, sizeof(sockaddr)) != 0) {
    if (errno == ECONNREFUSED || errno == ENOENT) { close(fd); return -1; }
    diee("connect() %s", socket_path);
  }
  if (!read_greeting(fd)) { close(fd); return -1; }
  return fd;
}


static void send_fd (int sock, int fd) {
  union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } c;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  char byte = 0;
  memset(&msg, 0, sizeof(msg));
  memset(&c, 0, sizeof(c));
  iov.iov_base = &byte;
  iov.iov_len = 1;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = c.buf;
  msg.msg_controllen = sizeof(c.buf);
  cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  while (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1)
    if (errno != EINTR) diee("send fd");
}


static char *put (char *p, const char *s) {
  size_t n = strlen(s) + 1;
  memcpy(p, s, n);
  return p + n;
}


/* signalling byte, fds 0 1 2, then length and request in one write */
static void send_request (int sock) {
  size_t len = 0;
  char *m, *p;
  char **e;
  char **a;
  for (e = environ; *e; e++)
    if (strchr(*e, '=')) len += strlen(*e) + 1;
  len++;
  for (a = exec_argv; *a; a++) len += strlen(*a) + 1;
  if (len > UINT32_MAX) die("cannot handle data with length >2^32");
  writen(sock, "", 1, "signalling byte");
  send_fd(sock, 0);
  send_fd(sock, 1);
  send_fd(sock, 2);
  p = m = (char *)xmalloc(len + 4);
  *p++ = (char)(len >> 24); *p++ = (char)(len >> 16);
  *p++ = (char)(len >> 8); *p++ = (char)len;
  for (e = environ; *e; e++)
    if (strchr(*e, '=')) p = put(p, *e);
  *p++ = '\0';
  for (a = exec_argv; *a; a++) p = put(p, *a);
  writen(sock, m, len + 4, "request");
  free(m);
}

/* }====================================================== */


/*
** {======================================================
** Exit status
** =======================================================
*/

static void propagate (int status, const char *what) {
  if (WIFEXITED(status)) exit(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    struct rlimit nocore = {0, 0};
    struct sigaction sa;
    sigset_t set;
    fflush(NULL);
    setrlimit(RLIMIT_CORE, &nocore);  /* the core is the executor's */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigemptyset(&set);
    sigaddset(&set, sig);
    if (sig != SIGKILL && sig != SIGSTOP) {
      if (sigaction(sig, &sa, NULL) != 0)
        diee("failed to reset signal %d while propagating it", sig);
      sigprocmask(SIG_UNBLOCK, &set, NULL);
    }
    raise(sig);
    _exit(128 + sig);  /* a signal that does not kill */
  }
  die("%s failed with weird wait status %d 0x%x", what, status, status);
}

/* }====================================================== */


/*
** {======================================================
** Spawning: watcher and setup
** =======================================================
*/

static int cmp_int (const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}


/* in a child: close every fd >= 3 but those in keep (at most 8) */
static void close_others (const int *keep, int n) {
  int k[9], i, lo = 3;
  if (n > 0) memcpy(k, keep, (size_t)n * sizeof(int));
  qsort(k, (size_t)n, sizeof(int), cmp_int);
  k[n] = INT_MAX;
  for (i = 0; i <= n; i++) {
    if (k[i] > lo) {
      unsigned hi = k[i] == INT_MAX ? ~0U : (unsigned)k[i] - 1;
      if (close_range((unsigned)lo, hi, 0) != 0) {
        int fd, top = (int)sysconf(_SC_OPEN_MAX);
        if (top < 0 || top > 65536) top = 65536;
        for (fd = lo; (unsigned)fd <= hi && fd < top; fd++) close(fd);
      }
    }
    if (k[i] >= lo) lo = k[i] == INT_MAX ? INT_MAX : k[i] + 1;
  }
}


static void nonblock (int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
    diee("set nonblocking");
}


static void keep_on_exec (int fd) {
  if (fcntl(fd, F_SETFD, 0) < 0) diee("clear close-on-exec");
}


/* 1 when the socket path no longer names the socket we bound */
static int socket_gone (void) {
  struct stat st;
  while (stat(socket_path, &st) != 0) {
    if (errno == ENOENT) return 1;
    if (errno != EINTR) diee("watcher: stat socket: %s", socket_path);
  }
  return !same_inode(&st, &initial_stab);
}


/* fd 0: the sentinel pipe (EOF: the server is gone); fd 1: the pipe the
   server reads our complaints from. Lives in a session of its own. */
static void become_watcher (void) {
  char *slash = strrchr(socket_path, '/');
  char buf[4096];
  struct pollfd p[2];
  int in;
  close_others(NULL, 0);
  in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (in < 0) diee("watcher: inotify_init");
  if (inotify_add_watch(in, socket_path, IN_ATTRIB | IN_DELETE_SELF |
                        IN_MOVE_SELF | IN_DONT_FOLLOW) < 0) {
    if (errno == ENOENT) _exit(0);
    diee("watcher: watch %s", socket_path);
  }
  *slash = '\0';  /* the directory: a rename over the name */
  if (inotify_add_watch(in, socket_path, IN_DELETE | IN_CREATE |
                        IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR) < 0)
    diee("watcher: watch %s", socket_path);
  *slash = '/';
  if (dup2(1, 2) != 2) diee("watcher: set daemonised stderr");
  setvbuf(stderr, NULL, _IOLBF, BUFSIZ);
  switch (fork()) {
    case -1: diee("watcher: fork");
    case 0: break;
    default: _exit(0);
  }
  if (setsid() < 0) diee("watcher: setsid");
  if (chdir("/") != 0) diee("watcher: chdir /");
  p[0].fd = 0; p[0].events = POLLIN;
  p[1].fd = in; p[1].events = POLLIN;
  for (;;) {
    if (socket_gone()) _exit(0);
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      diee("watcher: poll");
    }
    if (p[0].revents) _exit(0);  /* the server and its sentinel are gone */
    if (p[1].revents)
      while (read(in, buf, sizeof(buf)) > 0) ;
  }
}


static void become_setup (int sfd, int call, int watchi, int watche) {
  char v[128];
  int keep[4];
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  keep[0] = sfd; keep[1] = call; keep[2] = watchi; keep[3] = watche;
  if (null < 0) diee("open null");
  if (dup2(null, 0) != 0) diee("dup2 /dev/null onto stdin");
  if (dup2(2, 1) != 1) diee("dup2 stderr onto stdout");
  close_others(keep, 4);
  keep_on_exec(sfd); keep_on_exec(call);
  keep_on_exec(watchi); keep_on_exec(watche);
  nonblock(sfd);
  snprintf(v, sizeof(v), "v1,%jd.%09ld %d,%d,%d,%d",
           (intmax_t)initial_stab.st_mtim.tv_sec,
           (long)initial_stab.st_mtim.tv_nsec, sfd, call, watchi, watche);
  if (setenv("PREFORK_INTERP", v, 1) != 0) diee("setenv");
  execvp(exec_argv[0], exec_argv);
  diee("execute %s", exec_argv[0]);
}


static int spawn (int lockfd) {
  int sfd, pa[2], pb[2], pair[2], status;
  pid_t pid, got;
  if (unlink(socket_path) != 0 && errno != ENOENT)
    diee("failed to remove stale socket %s", socket_path);
  sfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sfd < 0) diee("socket() for new listener");
  if (bind(sfd, (const struct sockaddr *)&sockaddr, sizeof(sockaddr)) != 0)
    diee("bind() on new listener");
  if (stat(socket_path, &initial_stab) != 0) diee("stat() fresh socket");
  if (listen(sfd, INT_MAX) != 0) diee("listen() for new listener");
  if (pipe2(pa, O_CLOEXEC) != 0 || pipe2(pb, O_CLOEXEC) != 0)
    diee("pipe() for socket inode watcher");
  fflush(NULL);
  pid = fork();
  if (pid < 0) diee("fork for watcher");
  if (pid == 0) {
    if (dup2(pa[0], 0) != 0 || dup2(pb[1], 1) != 1)
      diee("initial dup2() for watcher");
    become_watcher();
  }
  while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR) ;
  close(pa[0]);
  close(pb[1]);
  nonblock(pb[0]);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
    diee("socketpair() for fake initial connection");
  pid = fork();
  if (pid < 0) diee("fork for spawn setup");
  if (pid == 0) become_setup(sfd, pair[1], pa[1], pb[0]);
  close(pair[1]); close(sfd); close(pa[1]); close(pb[0]);
  while ((got = waitpid(pid, &status, 0)) < 0)
    if (errno != EINTR) diee("waitpid setup [%ld]", (long)pid);
  if (status != 0) propagate(status, "setup");
  if (!read_greeting(pair[0]))
    die("setup failed: initial monitor process quit"
        " (maybe script didn't call preform_initialisation_complete?)");
  close(lockfd);
  return pair[0];
}


static int connect_or_spawn (void) {
  int fd = connect_existing(), lockfd;
  if (fd >= 0) return fd;
  preclean();
  lockfd = flock_file(lock_path);
  if (mode == 'k') {
    if (unlink(socket_path) != 0 && errno != ENOENT)
      diee("remove socket %s", socket_path);
    if (unlink(lock_path) != 0) diee("remove lock %s", lock_path);
    exit(0);
  }
  fd = connect_existing();
  if (fd >= 0) { close(lockfd); return fd; }
  return spawn(lockfd);
}

/* }====================================================== */


/*
** {======================================================
** Waiting for the status, forwarding signals
** =======================================================
*/

static const int fwd_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT,
                                  SIGUSR1, SIGUSR2, SIGWINCH};
static int sigpipe_w = -1;


static void on_signal (int sig) {
  int e = errno;
  unsigned char b = (unsigned char)sig;
  if (write(sigpipe_w, &b, 1) < 0) { /* full: the signal is dropped */ }
  errno = e;
}


/* forward those the caller did not leave ignored */
static int catch_signals (void) {
  int p[2];
  size_t i;
  struct sigaction sa, old;
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) diee("pipe() for signals");
  sigpipe_w = p[1];
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (i = 0; i < sizeof(fwd_signals) / sizeof(fwd_signals[0]); i++) {
    if (sigaction(fwd_signals[i], NULL, &old) != 0) diee("sigaction");
    if (old.sa_handler != SIG_IGN && sigaction(fwd_signals[i], &sa, NULL) != 0)
      diee("sigaction");
  }
  return p[0];
}


static void forward (int sock, int sigr) {
  unsigned char b[64];
  ssize_t n, i;
  while ((n = read(sigr, b, sizeof(b))) > 0)
    for (i = 0; i < n; i++)  /* a gone or stuffed peer is not fatal */
      if (send(sock, &b[i], 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 &&
          errno != EPIPE && errno != ECONNRESET && errno != EAGAIN &&
          errno != EINTR)
        diee("forward signal %d", b[i]);
}


static uint32_t wait_status (int sock) {
  unsigned char st[4];
  size_t have = 0;
  struct pollfd p[2];
  p[0].fd = sock; p[0].events = POLLIN;
  p[1].fd = catch_signals(); p[1].events = POLLIN;
  while (have < 4) {
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      diee("poll");
    }
    if (p[1].revents) forward(sock, p[1].fd);
    if (p[0].revents) {
      ssize_t r = read(sock, st + have, 4 - have);
      if (r > 0) have += (size_t)r;
      else if (r == 0 || errno == ECONNRESET)
        die("monitor process quit unexpectedly");
      else if (errno != EINTR && errno != EAGAIN)
        diee("read() on monitor call socket (status)");
    }
  }
  return get_be32(st);
}

/* }====================================================== */


/* the protocol needs fds 0 1 2: a closed one becomes /dev/null */
static void open_std (void) {
  int fd;
  for (fd = 0; fd < 3; fd++)
    if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
      diee("open /dev/null for fd %d", fd);
}


int main (int argc, char **argv) {
  int sock;
  uint32_t status;
  (void)argc;
  open_std();
  parse_args(argv);
  find_socket_path();
  sock = connect_or_spawn();
  send_request(sock);
  status = wait_status(sock);
  if (status > INT_MAX)
    die("status 0x%lx does not fit in an int", (unsigned long)status);
  propagate((int)status, "invocation");
  return 127;
}

#endif  /* } */
