/*
** msg.c: the lua-prefork command's messages and exits (errors exit 127
** with "lua-prefork: MSG[: strerror]", bad usage 255) and its memory.
*/

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"


static void vmsg (int err, const char *fmt, va_list ap) {
  fprintf(stderr, "%s: ", PROGNAME);
  vfprintf(stderr, fmt, ap);
  if (err) fprintf(stderr, ": %s", strerror(err));
  fputc('\n', stderr);
}


void die (const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vmsg(0, fmt, ap);
  va_end(ap);
  exit(127);
}


/* die with errno's strerror */
void diee (const char *fmt, ...) {
  int err = errno;
  va_list ap;
  va_start(ap, fmt);
  vmsg(err, fmt, ap);
  va_end(ap);
  exit(127);
}


void warning (const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s: warning: ", PROGNAME);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}


void usage (FILE *f) {
  fprintf(f, "usage: " PROGNAME " [OPTIONS] SCRIPT [ARGS]"
             "            (runs SCRIPT with " LUA_PREFORK_LUA ")\n"
             "       " PROGNAME " -U [OPTIONS] INTERP SCRIPT [ARGS]\n"
             "       #!/usr/bin/" PROGNAME " -U,INTERP[,FLAG...]\n"
             "options: -f (fresh server)  --kill  -E VAR  -G STRING  "
             "-g IDENT  --help\n");
}


void badusage (const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  usage(stderr);
  exit(255);
}


void *xmalloc (size_t n) {
  void *p = malloc(n ? n : 1);
  if (p == NULL) die("not enough memory");
  return p;
}


char *xasprintf (const char *fmt, ...) {
  char *s;
  va_list ap;
  va_start(ap, fmt);
  if (vasprintf(&s, fmt, ap) < 0) die("not enough memory");
  va_end(ap);
  return s;
}
