/*
** rundir.c: where the servers' sockets live, as Debian's wrapper has it:
** the run directory (/var/run/user/UID/prefork-interp, else
** ~/.prefork-interp/HOST), the socket path sIDENT and the lock lIDENT in
** it, and preclean, which removes the least recently used idents beyond
** MAXSOCKETS. A run directory that is not ours alone is refused.
*/

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <nettle/sha2.h>

#include "client.h"

#define MINHEXHASH 33
#define MAXSOCKETS 100   /* idents kept in the run dir by preclean */


/* {======================================================
** Run directory, socket path, lock
** ======================================================= */

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
  else cl.run_base = xasprintf("%s/" RUNNAME, dir);
  return cl.run_base != NULL;
}


/* refuses a run dir (lstat'ed into st) that is not ours alone */
static void check_run_base (uid_t us, const struct stat *st) {
  if (!S_ISDIR(st->st_mode))
    die("run directory %s is not a directory", cl.run_base);
  if (st->st_uid != us)
    die("run directory %s is not owned by uid %lu", cl.run_base,
        (unsigned long)us);
  if (st->st_mode & 077)
    die("run directory %s is accessible by group or other (mode %03o)",
        cl.run_base, (unsigned)(st->st_mode & 0777));
}


/* the run dir, made (with parent, for ~) when it is not there yet */
static void make_run_base (uid_t us, const char *parent) {
  const char *rb = cl.run_base;
  struct stat st;
  if (lstat(rb, &st) != 0) {
    if (mkdir(rb, 0700) != 0) {
      if (errno == ENOENT && parent) {
        if (mkdir(parent, 0700) != 0 && errno != EEXIST)
          diee("mkdir %s (since %s was ENOENT)", parent, rb);
        if (mkdir(rb, 0700) != 0 && errno != EEXIST) diee("mkdir %s", rb);
      }
      else if (errno != EEXIST) diee("mkdir %s", rb);
    }
    if (lstat(rb, &st) != 0) diee("run directory %s", rb);
  }
  check_run_base(us, &st);
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


/* ~/.prefork-interp/HOST (the host name to its first dot, 32 bytes at
** most); its parent */
static char *home_run_base (uid_t us) {
  char *home = home_of(us), *parent, *dot;
  char node[sizeof(cl.uts.nodename)];
  memcpy(node, cl.uts.nodename, sizeof(node));
  if ((dot = strchr(node, '.')) != NULL) *dot = '\0';
  node[32] = '\0';
  parent = xasprintf("%s/." RUNNAME, home);
  free(home);
  cl.run_base = xasprintf("%s/%s", parent, node);
  return parent;
}


/* the ident: the hash's first hex digits (64 at most, as many as the
** socket path has room for) */
static const char *hash_ident (int maxident) {
  int len = maxident > 64 ? 64 : maxident, i;
  unsigned char h[SHA256_DIGEST_SIZE];
  char *hex;
  if (maxident < MINHEXHASH)
    die("base directory `%s' leaves only %d characters for id hash"
        " which is too little (<%d)", cl.run_base, maxident, MINHEXHASH);
  ident_string('i', cl.interp);
  for (i = 0; i < cl.niflags; i++) ident_string('f', cl.iflags[i]);
  if (cl.script) ident_string('s', cl.script);
  ident_digest(h, sizeof(h));
  hex = (char *)xmalloc((size_t)len + 2);
  for (i = 0; i < len; i += 2) sprintf(hex + i, "%02x", h[i / 2]);
  hex[len] = '\0';
  return hex;
}


/* the run dir, the ident, the socket and lock paths */
void find_socket_path (void) {
  uid_t us = getuid();
  char *parent = NULL;
  int maxident;
  if (!var_run_ok(us)) parent = home_run_base(us);
  maxident = (int)sizeof(cl.addr.sun_path) - (int)strlen(cl.run_base) - 12;
  if (cl.ident == NULL) cl.ident = hash_ident(maxident);
  if ((int)strlen(cl.ident) > maxident)
    die("base directory `%s' plus ident `%s' too long (with spare)"
        " for socket (max ident %d)", cl.run_base, cl.ident, maxident);
  make_run_base(us, parent);
  free(parent);
  cl.socket_path = xasprintf("%s/s%s", cl.run_base, cl.ident);
  cl.lock_path = xasprintf("%s/l%s", cl.run_base, cl.ident);
  memset(&cl.addr, 0, sizeof(cl.addr));
  cl.addr.sun_family = AF_UNIX;
  strcpy(cl.addr.sun_path, cl.socket_path);
}


int same_inode (const struct stat *a, const struct stat *b) {
  return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}


/* take the lock at path; survives the file being unlinked meanwhile */
int flock_file (const char *path) {
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


/* {======================================================
** Preclean: beyond MAXSOCKETS idents, remove the least recently used
** ======================================================= */

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
  char *s = xasprintf("%s/s%s", cl.run_base, name);
  int r = lstat(s, &st);
  if (r != 0 && errno != ENOENT) diee("pre-cleanup: stat socket (%s)", s);
  free(s);
  return r == 0 ? st.st_atime : 0;
}


static void preclean_one (const Entry *e) {
  char *l = xasprintf("%s/l%s", cl.run_base, e->name);
  char *s = xasprintf("%s/s%s", cl.run_base, e->name);
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


/* the idents of the run dir (from its sN and lN entries), sorted, each
** once; their number */
static size_t idents (DIR *d, Entry **e) {
  size_t n = 0, cap = 0, i, k;
  struct dirent *de;
  while ((errno = 0, de = readdir(d)) != NULL) {
    if (de->d_name[0] != 'l' && de->d_name[0] != 's') continue;
    if (n == cap) {
      cap = cap * 2 + 16;
      if ((*e = (Entry *)realloc(*e, cap * sizeof(Entry))) == NULL)
        die("not enough memory");
    }
    (*e)[n].name = xasprintf("%s", de->d_name + 1);
    (*e)[n].atime = socket_atime((*e)[n].name);
    n++;
  }
  if (errno) diee("pre-cleanup: read run dir (%s)", cl.run_base);
  if (n > 0) qsort(*e, n, sizeof(Entry), cmp_name);
  for (i = k = 0; i < n; i++) {  /* dedupe */
    if (k > 0 && strcmp((*e)[i].name, (*e)[k - 1].name) == 0)
      free((*e)[i].name);
    else (*e)[k++] = (*e)[i];
  }
  return k;
}


void preclean (void) {
  DIR *d = opendir(cl.run_base);
  Entry *e = NULL;
  size_t n, i;
  if (d == NULL) {
    if (errno == ENOENT) return;
    diee("pre-cleanup: open run dir (%s)", cl.run_base);
  }
  n = idents(d, &e);
  closedir(d);
  if (n > MAXSOCKETS) {
    qsort(e, n, sizeof(Entry), cmp_atime);
    for (i = 0; i < n - MAXSOCKETS; i++) preclean_one(&e[i]);
  }
  for (i = 0; i < n; i++) free(e[i].name);
  free(e);
}

/* }====================================================== */
