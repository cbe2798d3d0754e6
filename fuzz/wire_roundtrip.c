/*
** fuzz/wire_roundtrip.c: libFuzzer target that round-trips every message
** of the prefork-interp wire (src/wire.c) through its encoder and its
** decoder, with values taken from the input: the greeting, the
** PREFORK_INTERP value, the request (environment and argv, with its
** length), the message that carries an fd, and the status. What is
** decoded must be what was encoded (the request leaves out environment
** entries without '=', as the client does), and nothing may crash.
*/

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "../src/wire.h"

int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);


/* the input as a stream of values */
typedef struct in { const unsigned char *p; size_t n; } in;

static unsigned long long take (in *s, int bytes) {
  unsigned long long v = 0;
  while (bytes-- > 0) {
    v = v << 8 | (s->n > 0 ? *s->p : 0);
    if (s->n > 0) { s->p++; s->n--; }
  }
  return v;
}


static void greeting (void) {
  unsigned char g[PF_GREETLEN];
  size_t want = 0;
  if (pf_greet_encode(g) != PF_GREETLEN
      || pf_greet_parse(g, PF_GREETLEN, &want) != PF_GREET_OK
      || want != PF_GREETLEN)
    abort();
}


static void ienv (in *s) {
  pf_ienv e, d;
  char buf[PF_IENVLEN];
  int i, n;
  e.sec = (long long)(take(s, 8) % ((unsigned long long)LLONG_MAX / 10));
  e.nsec = (long)(take(s, 4) % 1000000000UL);
  for (i = 0; i < 4; i++) e.fd[i] = (int)(take(s, 4) % ((unsigned)INT_MAX + 1));
  n = pf_ienv_format(buf, sizeof(buf), &e);
  if (n <= 0 || (size_t)n >= sizeof(buf)) abort();
  if (pf_ienv_parse(buf, &d) != NULL || d.sec != e.sec || d.nsec != e.nsec
      || memcmp(d.fd, e.fd, sizeof(e.fd)) != 0)
    abort();
}


/* up to max strings cut from the input at 0xff bytes (NULs become 1) */
static int strings (in *s, char **v, int max) {
  int k = 0;
  while (k < max && s->n > 0) {
    size_t len = 0, j;
    while (len < s->n && s->p[len] != 0xff) len++;
    v[k] = (char *)malloc(len + 1);
    for (j = 0; j < len; j++) v[k][j] = s->p[j] != 0 ? (char)s->p[j] : 1;
    v[k][len] = '\0';
    k++;
    s->p += len < s->n ? len + 1 : len;
    s->n -= len < s->n ? len + 1 : len;
  }
  v[k] = NULL;
  return k;
}


/* what the request's decoding must give: v's strings (with '=' only,
** for the environment) */
static void same (char **got, int ngot, char **v, int env) {
  int i, k = 0;
  for (i = 0; v[i] != NULL; i++) {
    if (env && strchr(v[i], '=') == NULL) continue;
    if (k >= ngot || strcmp(got[k], v[i]) != 0) abort();
    k++;
  }
  if (k != ngot) abort();
}


static void request (in *s) {
  char *env[17], *argv[17];
  int i, nenv = (int)(take(s, 1) % 17);
  size_t len, got;
  unsigned char *msg;
  pf_req r;
  strings(s, env, nenv);
  if (strings(s, argv, 16) == 0) {
    argv[0] = strdup("lua5.4");
    argv[1] = NULL;
  }
  len = pf_req_size(env, argv);
  msg = (unsigned char *)malloc(len + 4);
  pf_req_encode(msg, env, argv, len);
  if (len <= PF_MAXREQ) {
    if (pf_req_len(msg, &got) != NULL || got != len) abort();
    if (pf_req_parse((char *)msg + 4, len, &r) != NULL) abort();
    same(r.env, r.nenv, env, 1);
    same(r.argv, r.nargv, argv, 0);
    free(r.env);
  }
  else if (pf_req_len(msg, &got) == NULL) abort();
  for (i = 0; env[i] != NULL; i++) free(env[i]);
  for (i = 0; argv[i] != NULL; i++) free(argv[i]);
  free(msg);
}


static void fdmsg (in *s) {
  struct msghdr m;
  struct iovec iov;
  pf_fdctl ctl;
  unsigned char byte = (unsigned char)take(s, 1);
  int fd = (int)(take(s, 4) % ((unsigned)INT_MAX + 1));
  pf_fdmsg_build(&m, &iov, &ctl, &byte, fd);
  if (pf_fdmsg_fd(&m) != fd || m.msg_iovlen != 1 || iov.iov_len != 1
      || *(unsigned char *)iov.iov_base != byte)
    abort();
}


static void status (in *s) {
  unsigned char b[4];
  int st = (int)(unsigned)take(s, 4), back = -1;
  pf_status_encode(b, st);
  if (st >= 0 ? !pf_status_decode(b, &back) || back != st
              : pf_status_decode(b, &back))
    abort();
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  in s;
  s.p = data;
  s.n = size;
  greeting();
  ienv(&s);
  fdmsg(&s);
  status(&s);
  request(&s);
  return 0;
}
