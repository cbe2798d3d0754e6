/*
** wire.c: the prefork-interp wire, both halves of each message side by
** side (see wire.h for the exchange). Pure functions: no I/O, no Lua, no
** libev; plain C99, compiled into prefork.core (the server, src/interp*.c)
** and into the static lua-prefork command alike, and fuzzed round trip
** (fuzz/wire_roundtrip.c) and parser by parser.
*/

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"


static const unsigned char magic[4] = {'P', 'F', 'I', '\n'};


/* {======================================================
** The greeting: "PFI\n", a u32 XLEN, XLEN bytes of extra data
** ======================================================= */

/* a server's greeting: no extra data (Debian's client reads XLEN in host
** order: 0 is the one value both orders agree on); its length */
size_t pf_greet_encode (unsigned char *buf) {
  memcpy(buf, magic, sizeof(magic));
  pf_put32(buf + 4, 0);
  return PF_GREETLEN;
}


/* a client's view of the len bytes received so far: PF_GREET_* */
int pf_greet_parse (const unsigned char *buf, size_t len, size_t *want) {
  uint32_t xlen;
  if (memcmp(buf, magic, len < 4 ? len : 4) != 0) return PF_GREET_BADMAGIC;
  if (len < 8) { *want = 8; return PF_GREET_MORE; }
  xlen = pf_get32(buf + 4);
  if (xlen > PF_MAXXLEN) return PF_GREET_TOOBIG;
  *want = 8 + (size_t)xlen;
  return len >= *want ? PF_GREET_OK : PF_GREET_MORE;
}

/* }====================================================== */


/* {======================================================
** PREFORK_INTERP: "v1,SECS.NSECS[,...] LISTEN,CALL,WATCHI,WATCHE[...]"
** ======================================================= */

/* the wrapper's value for e; the length, as snprintf's */
int pf_ienv_format (char *buf, size_t size, const pf_ienv *e) {
  return snprintf(buf, size, "v1,%lld.%09ld %d,%d,%d,%d", e->sec, e->nsec,
                  e->fd[0], e->fd[1], e->fd[2], e->fd[3]);
}


/* a decimal number of at most max at *p, which moves past it: 0 when
** there is no digit or it is over max */
static int number (const char **p, long long max, long long *v) {
  const char *s = *p;
  *v = 0;
  if (*s < '0' || *s > '9') return 0;
  for (; *s >= '0' && *s <= '9'; s++) {
    if (*v > (max - (*s - '0')) / 10) return 0;
    *v = *v * 10 + (*s - '0');
  }
  *p = s;
  return 1;
}


/* the mtime "SECS.NSECS" (exactly nine digits of nanoseconds) at *p */
static const char *mtime (const char **p, pf_ienv *e) {
  const char *s = *p;
  long long sec;
  int i;
  if (!number(&s, LLONG_MAX / 10, &sec) || *s++ != '.') return "bad mtime";
  e->sec = sec;
  e->nsec = 0;
  for (i = 0; i < 9; i++, s++) {
    if (*s < '0' || *s > '9') return "bad mtime (nanoseconds)";
    e->nsec = e->nsec * 10 + (*s - '0');
  }
  if (*s != ',' && *s != ' ') return "bad mtime (nanoseconds)";
  *p = s;
  return NULL;
}


/* the four fds "LISTEN,CALL,WATCHI,WATCHE" at p */
static const char *fdlist (const char *p, pf_ienv *e) {
  int i;
  for (i = 0; i < 4; i++) {
    long long fd;
    if (!number(&p, INT_MAX, &fd)) return "bad fd list";
    e->fd[i] = (int)fd;
    if (i < 3 && *p++ != ',') return "fewer than 4 fds";
  }
  if (*p != ',' && *p != ' ' && *p != '\0') return "bad fd list";
  return NULL;
}


/* the server's parse of the value: NULL when good, else what is wrong
** (items after the mtime and after the fds are for extensions) */
const char *pf_ienv_parse (const char *s, pf_ienv *e) {
  const char *err;
  if (strncmp(s, "v1", 2) != 0 || (s[2] != ',' && s[2] != ' ' && s[2] != '\0'))
    return "not version v1";
  s += 2;
  if (*s++ != ',') return "no mtime";
  if ((err = mtime(&s, e)) != NULL) return err;
  while (*s != ' ' && *s != '\0') s++;
  if (*s++ != ' ') return "no fds";
  return fdlist(s, e);
}

/* }====================================================== */


/* {======================================================
** The request: a u32 length, then the environment (each entry with
** '='), an empty string, argv (at least one); NUL-terminated strings
** ======================================================= */

/* the request's length for env (entries without '=' are left out) and
** argv, both NULL-terminated; the u32 before it not counted */
size_t pf_req_size (char *const *env, char *const *argv) {
  size_t len = 1;  /* the empty string */
  for (; *env != NULL; env++)
    if (strchr(*env, '=') != NULL) len += strlen(*env) + 1;
  for (; *argv != NULL; argv++) len += strlen(*argv) + 1;
  return len;
}


/* append s and its NUL at p: the end */
static unsigned char *put (unsigned char *p, const char *s) {
  size_t n = strlen(s) + 1;
  memcpy(p, s, n);
  return p + n;
}


/* the whole message into out (4 + len bytes), len from pf_req_size */
void pf_req_encode (unsigned char *out, char *const *env, char *const *argv,
                    size_t len) {
  unsigned char *p = out + 4;
  pf_put32(out, (uint32_t)len);
  for (; *env != NULL; env++)
    if (strchr(*env, '=') != NULL) p = put(p, *env);
  *p++ = '\0';
  for (; *argv != NULL; argv++) p = put(p, *argv);
}


/* the length the u32 at b announces: NULL, or why it is refused */
const char *pf_req_len (const unsigned char *b, size_t *len) {
  uint32_t n = pf_get32(b);
  if (n > PF_MAXREQ) return "request too long";
  *len = (size_t)n;
  return NULL;
}


/* undo a failed parse; its reason */
static const char *badreq (pf_req *r, const char *why) {
  free(r->env);
  r->env = r->argv = NULL;
  r->nenv = r->nargv = 0;
  return why;
}


/* the string buf[start..i) (NUL at i) into r: environment entry, the
** empty string that ends them, or an argument */
static const char *reqitem (char *buf, size_t start, size_t i, pf_req *r) {
  if (r->argv == NULL && i == start)  /* the empty string: argv follows */
    r->argv = r->env + r->nenv + 1;
  else if (r->argv == NULL) {
    if (memchr(buf + start, '=', i - start) == NULL)
      return "environment entry without '='";
    r->env[r->nenv++] = buf + start;
  }
  else
    r->argv[r->nargv++] = buf + start;
  return NULL;
}


/*
** The server's parse of the request's len bytes, in place: r->env and
** r->argv point into buf, which must outlive them (one allocation, of
** r->env, to free). NULL when good, else what is wrong (and r empty).
*/
const char *pf_req_parse (char *buf, size_t len, pf_req *r) {
  size_t i, n = 0, start;
  r->nenv = r->nargv = 0;
  r->env = r->argv = NULL;
  if (len > PF_MAXREQ) return "request too long";
  if (len == 0 || buf[len - 1] != '\0') return "request not NUL-terminated";
  for (i = 0; i < len; i++)
    if (buf[i] == '\0') n++;  /* strings */
  if ((r->env = (char **)calloc(n + 2, sizeof(char *))) == NULL)
    return "not enough memory";
  for (start = 0, i = 0; i < len; i++) {
    const char *err;
    if (buf[i] != '\0') continue;
    if ((err = reqitem(buf, start, i, r)) != NULL) return badreq(r, err);
    start = i + 1;
  }
  if (r->argv == NULL) return badreq(r, "no end of the environment");
  if (r->nargv < 1) return badreq(r, "no argv");
  r->env[r->nenv] = NULL;
  r->argv[r->nargv] = NULL;
  return NULL;
}

/* }====================================================== */


/* {======================================================
** The fds: three messages of one byte, each with one fd (SCM_RIGHTS)
** ======================================================= */

/* the header of a message of the one byte at *byte carrying fd */
void pf_fdmsg_build (struct msghdr *m, struct iovec *iov, pf_fdctl *ctl,
                     unsigned char *byte, int fd) {
  struct cmsghdr *cm;
  memset(m, 0, sizeof(*m));
  memset(ctl, 0, sizeof(*ctl));
  iov->iov_base = byte;
  iov->iov_len = 1;
  m->msg_iov = iov;
  m->msg_iovlen = 1;
  m->msg_control = ctl->buf;
  m->msg_controllen = sizeof(ctl->buf);
  cm = CMSG_FIRSTHDR(m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof(int));
}


/* the one fd a message's header carries, or -1 */
int pf_fdmsg_fd (struct msghdr *m) {
  struct cmsghdr *cm = CMSG_FIRSTHDR(m);
  int fd;
  if (cm == NULL || cm->cmsg_level != SOL_SOCKET
      || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(sizeof(int)))
    return -1;
  memcpy(&fd, CMSG_DATA(cm), sizeof(int));
  return fd;
}

/* }====================================================== */


/* {======================================================
** The status: the executor's raw wait status, a u32
** ======================================================= */

void pf_status_encode (unsigned char *b, int status) {
  pf_put32(b, (uint32_t)status);
}


/* 1 with *status, 0 when the u32 is no int (over INT_MAX) */
int pf_status_decode (const unsigned char *b, int *status) {
  uint32_t u = pf_get32(b);
  if (u > INT_MAX) return 0;
  *status = (int)u;
  return 1;
}

/* }====================================================== */
