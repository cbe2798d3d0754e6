/*
** fuzz/interp_env.c: libFuzzer target for the PREFORK_INTERP parser
** (pf_ienv_parse, src/wire.c), called directly on a NUL-terminated copy
** of the input. It must not crash; when it accepts, the value must start
** with "v1,", the nanoseconds must be below 10^9 and the fds
** non-negative, and printing what it found back must give a prefix of
** the input (up to the extension items it skips).
*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/wire.h"

int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);


/* the fds after the first space: as printed, or the same numbers */
static void checkfds (const char *s, const pf_ienv *e) {
  char head[64];
  const char *sp = strchr(s, ' ');
  int n, f[4];
  if (sp == NULL) abort();
  n = snprintf(head, sizeof(head), "%d,%d,%d,%d", e->fd[0], e->fd[1],
               e->fd[2], e->fd[3]);
  if (n > 0 && strncmp(sp + 1, head, (size_t)n) != 0  /* leading zeros */
      && (sscanf(sp + 1, "%d,%d,%d,%d", &f[0], &f[1], &f[2], &f[3]) != 4
          || memcmp(f, e->fd, sizeof(f)) != 0))
    abort();
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  pf_ienv e;
  char *s, head[64];
  int i;
  if (size > 4096) return 0;
  s = (char *)malloc(size + 1);
  if (s == NULL) return 0;
  memcpy(s, data, size);
  s[size] = '\0';
  if (pf_ienv_parse(s, &e) == NULL) {
    if (strncmp(s, "v1,", 3) != 0) abort();
    if (e.nsec < 0 || e.nsec >= 1000000000L || e.sec < 0) abort();
    for (i = 0; i < 4; i++)
      if (e.fd[i] < 0) abort();
    snprintf(head, sizeof(head), "v1,%lld.%09ld", e.sec, e.nsec);
    /* the seconds may have leading zeros in the input: compare the rest */
    if (strstr(s, head + 3 + strspn(head + 3, "0")) == NULL && e.sec != 0)
      abort();
    checkfds(s, &e);
  }
  free(s);
  return 0;
}
