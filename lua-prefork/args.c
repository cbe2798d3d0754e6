/*
** args.c: the lua-prefork command line (Debian's wrapper's options, the
** combined #! word, the plain form that is -U LUA) and the ident hash,
** whose items follow Debian's wrapper byte for byte: items 1 to 7 first,
** the -E/-G items as the options come, then interpreter, flags, script
** (rundir.c adds those three).
*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <nettle/sha2.h>

#include "client.h"

#define MAXPIECES 3  /* option pieces before INTERP in a combined word */

client cl;

static struct sha256_ctx identsc;
static int unlaundered;  /* -U */
static char lua_name[] = LUA_PREFORK_LUA;


/* {======================================================
** The ident hash
** ======================================================= */

static void ident_key (char key) {
  sha256_update(&identsc, 1, (const uint8_t *)&key);
}


static void ident_obj (char key, const void *p, size_t n) {
  ident_key(key);
  sha256_update(&identsc, n, (const uint8_t *)p);
}


void ident_string (char key, const char *s) {
  ident_obj(key, s, strlen(s) + 1);
}


void ident_digest (unsigned char *h, size_t n) {
  sha256_digest(&identsc, n, h);
}


static void ident_stat (const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) diee("failed to stat %s", path);
  ident_obj(path[0], &st.st_dev, sizeof(st.st_dev));
  ident_obj('i', &st.st_ino, sizeof(st.st_ino));
}


/* items 1 to 7 of the hash: they come before the -E/-G items */
static void ident_init (void) {
  size_t utslen = sizeof(cl.uts);
  memset(&cl.uts, 0, sizeof(cl.uts));
  if (uname(&cl.uts) != 0) diee("uname failed!");
  sha256_init(&identsc);
  ident_key(1);
  ident_obj('u', &utslen, sizeof(utslen));
  ident_obj('u', &cl.uts, sizeof(cl.uts));
  ident_stat(".");
  ident_stat("/");
}


static void ident_env (const char *name) {
  const char *v = getenv(name);
  ident_string('E', name);
  if (v) ident_string('v', v);
  else ident_key(0);
}

/* }====================================================== */


/* {======================================================
** Options
** ======================================================= */

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
  else cl.ident = v;
  return used;
}


static void long_option (const char *w) {
  const char *eq = strchr(w, '=');
  size_t n = eq ? (size_t)(eq - w) : strlen(w);
  if (n == 4 && strncmp(w, "kill", 4) == 0) {
    if (eq) badusage("--kill option does not take a value");
    cl.mode = 'k';
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
      else if (*p == 'f') cl.mode = 'f';
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


/* INTERP and its flags after the options of a combined word */
static void combined_interp (char *rest, size_t maxflags) {
  if (rest == NULL || *rest == '\0')
    badusage("combined arg lacks <interpreter>");
  cl.interp = rest;
  rest = cut(rest);
  cl.iflags = (char **)xmalloc(maxflags * sizeof(char *));
  while (rest) {
    char *next = cut(rest);
    if (*rest) cl.iflags[cl.niflags++] = rest;
    rest = next;
  }
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
  if (unlaundered)
    combined_interp(rest, strlen(word) + 1);
  else if (rest && *rest)
    badusage("combined arg names an interpreter but lacks -U");
}


/* exec_argv: INTERP, FLAGS..., SCRIPT, ARGS (w) */
static void make_exec_argv (char **w) {
  char **out;
  int n;
  for (n = 0; w[n]; n++) ;
  cl.exec_argv = out = (char **)xmalloc((size_t)(n + cl.niflags + 3)
                                        * sizeof(char *));
  *out++ = cl.interp;
  if (cl.niflags > 0)
    memcpy(out, cl.iflags, (size_t)cl.niflags * sizeof(char *));
  out += cl.niflags;
  if (cl.script) *out++ = cl.script;
  memcpy(out, w, (size_t)(n + 1) * sizeof(char *));
}


/* sets interp, iflags, script and exec_argv */
void parse_args (char **argv) {
  char **w = argv + 1;
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
      cl.interp = *w++;
    }
  }
  if (!unlaundered) {
    if (*w == NULL) badusage("need script argument");
    cl.interp = lua_name;
  }
  if (*w) cl.script = *w++;
  make_exec_argv(w);
}

/* }====================================================== */
