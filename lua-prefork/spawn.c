/*
** spawn.c: a new server, as Debian's wrapper starts one (reference:
** docs/interp.md and src/wire.h): a fresh listening socket, the watcher
** (a daemon that ends the server when the socket is replaced or
** removed), and SETUP, the script itself with PREFORK_INTERP, whose first
** call is ours, on a socketpair. SETUP and the watcher get only the fds
** the protocol names.
*/

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "client.h"


static int cmp_int (const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}


/* close fds lo..hi, one by one if close_range is missing */
static void close_span (int lo, unsigned hi) {
  if (close_range((unsigned)lo, hi, 0) != 0) {
    int fd, top = (int)sysconf(_SC_OPEN_MAX);
    if (top < 0 || top > 65536) top = 65536;
    for (fd = lo; (unsigned)fd <= hi && fd < top; fd++) close(fd);
  }
}


/* in a child: close every fd >= 3 but those in keep (at most 8) */
static void close_others (const int *keep, int n) {
  int k[9], i, lo = 3;
  if (n > 0) memcpy(k, keep, (size_t)n * sizeof(int));
  qsort(k, (size_t)n, sizeof(int), cmp_int);
  k[n] = INT_MAX;
  for (i = 0; i <= n; i++) {
    if (k[i] > lo)
      close_span(lo, k[i] == INT_MAX ? ~0U : (unsigned)k[i] - 1);
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


static void waitfor (pid_t pid, int *status, const char *what) {
  while (waitpid(pid, status, 0) < 0)
    if (errno != EINTR) diee("waitpid %s [%ld]", what, (long)pid);
}


/* {======================================================
** The watcher
** ======================================================= */

/* 1 when the socket path no longer names the socket we bound */
static int socket_gone (void) {
  struct stat st;
  while (stat(cl.socket_path, &st) != 0) {
    if (errno == ENOENT) return 1;
    if (errno != EINTR) diee("watcher: stat socket: %s", cl.socket_path);
  }
  return !same_inode(&st, &cl.initial_stab);
}


/* inotify on the socket and on its directory (a rename over the name) */
static int watch_socket (void) {
  char *slash = strrchr(cl.socket_path, '/');
  int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (in < 0) diee("watcher: inotify_init");
  if (inotify_add_watch(in, cl.socket_path, IN_ATTRIB | IN_DELETE_SELF |
                        IN_MOVE_SELF | IN_DONT_FOLLOW) < 0) {
    if (errno == ENOENT) _exit(0);
    diee("watcher: watch %s", cl.socket_path);
  }
  *slash = '\0';
  if (inotify_add_watch(in, cl.socket_path, IN_DELETE | IN_CREATE |
                        IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR) < 0)
    diee("watcher: watch %s", cl.socket_path);
  *slash = '/';
  return in;
}


/* fd 0: the sentinel pipe (EOF: the server is gone); fd 1: the pipe the
   server reads our complaints from. Lives in a session of its own. */
static void become_watcher (void) {
  char buf[4096];
  struct pollfd p[2];
  int in;
  close_others(NULL, 0);
  in = watch_socket();
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


/* the watcher, with the pipes a (its sentinel) and b (its complaints) */
static void start_watcher (int a[2], int b[2]) {
  int status;
  pid_t pid;
  if (pipe2(a, O_CLOEXEC) != 0 || pipe2(b, O_CLOEXEC) != 0)
    diee("pipe() for socket inode watcher");
  fflush(NULL);
  pid = fork();
  if (pid < 0) diee("fork for watcher");
  if (pid == 0) {
    if (dup2(a[0], 0) != 0 || dup2(b[1], 1) != 1)
      diee("initial dup2() for watcher");
    become_watcher();
  }
  waitfor(pid, &status, "watcher");
  close(a[0]);
  close(b[1]);
  nonblock(b[0]);
}

/* }====================================================== */


/* {======================================================
** SETUP and the first call
** ======================================================= */

/* the last component of path */
static const char *base (const char *path) {
  const char *slash = strrchr(path, '/');
  return slash != NULL ? slash + 1 : path;
}


static void become_setup (int sfd, int call, int watchi, int watche) {
  char v[PF_IENVLEN];
  int keep[4];
  pf_ienv e;
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  keep[0] = sfd; keep[1] = call; keep[2] = watchi; keep[3] = watche;
  if (null < 0) diee("open null");
  if (dup2(null, 0) != 0) diee("dup2 /dev/null onto stdin");
  if (dup2(2, 1) != 1) diee("dup2 stderr onto stdout");
  close_others(keep, 4);
  keep_on_exec(sfd); keep_on_exec(call);
  keep_on_exec(watchi); keep_on_exec(watche);
  nonblock(sfd);
  e.sec = (long long)cl.initial_stab.st_mtim.tv_sec;
  e.nsec = (long)cl.initial_stab.st_mtim.tv_nsec;
  memcpy(e.fd, keep, sizeof(e.fd));
  pf_ienv_format(v, sizeof(v), &e);
  if (setenv("PREFORK_INTERP", v, 1) != 0) diee("setenv");
  /* a Lua server binds every symbol at its start, so that no executor
  ** binds one on its call (each binding writes a page it shares with the
  ** server: 13 pages copied a call, 0.15 ms). Lua loads C modules with
  ** RTLD_NOW anyway; another interpreter's (Perl's XS) may rely on lazy
  ** binding, and is left as it is. A value of the caller's stays. */
  if (strncmp(base(cl.exec_argv[0]), "lua", 3) == 0
      && setenv("LD_BIND_NOW", "1", 0) != 0)
    diee("setenv");
  execvp(cl.exec_argv[0], cl.exec_argv);
  diee("execute %s", cl.exec_argv[0]);
}


/* a fresh listening socket on the socket path */
static int listener (void) {
  int sfd;
  if (unlink(cl.socket_path) != 0 && errno != ENOENT)
    diee("failed to remove stale socket %s", cl.socket_path);
  sfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sfd < 0) diee("socket() for new listener");
  if (bind(sfd, (const struct sockaddr *)&cl.addr, sizeof(cl.addr)) != 0)
    diee("bind() on new listener");
  if (stat(cl.socket_path, &cl.initial_stab) != 0) diee("stat() fresh socket");
  if (listen(sfd, INT_MAX) != 0) diee("listen() for new listener");
  return sfd;
}


/* a new server (we hold the lock): its first call, the greeting read and
** the request sent */
int spawn (int lockfd) {
  int sfd = listener(), a[2], b[2], pair[2], status;
  pid_t pid;
  start_watcher(a, b);
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
    diee("socketpair() for fake initial connection");
  pid = fork();
  if (pid < 0) diee("fork for spawn setup");
  if (pid == 0) become_setup(sfd, pair[1], a[1], b[0]);
  close(pair[1]); close(sfd); close(a[1]); close(b[0]);
  waitfor(pid, &status, "setup");
  if (status != 0) propagate(status, "setup");
  if (!call_greeting(pair[0]))
    die("setup failed: initial monitor process quit"
        " (maybe script didn't call preform_initialisation_complete?)");
  close(lockfd);
  call_send(pair[0]);
  return pair[0];
}

/* }====================================================== */
