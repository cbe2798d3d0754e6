/*
** client.h: what the files of the lua-prefork command share. From the
** bottom up (a file calls only the files above it in this list):
**   ../src/wire.c   the prefork-interp wire, pure (shared with the server)
**   msg.c           messages, exits, memory
**   args.c          options, interpreter and script, the ident hash
**   rundir.c        the run directory, socket path, lock, preclean
**   call.c          one call: connect, the server's credentials, the
**                   request, the greeting, the status, signals
**   spawn.c         a new server: the watcher and the setup process
**   main.c          main
*/

#if !defined(client_h)
#define client_h

#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>

#include "../src/wire.h"

#ifndef LUA_PREFORK_LUA
#define LUA_PREFORK_LUA "lua5.4"
#endif

#define PROGNAME "lua-prefork"
#define RUNNAME "prefork-interp"  /* shared with Debian's wrapper */

#if defined(__GNUC__)
#define CL_NORETURN	__attribute__((noreturn))
#define CL_PRINTF(f,a)	__attribute__((format(printf, f, a)))
#else
#define CL_NORETURN
#define CL_PRINTF(f,a)
#endif


/* the command's state, filled in that order by args.c and rundir.c */
typedef struct client {
  int mode;  /* 0, 'f' (fresh server) or 'k' (--kill) */
  char *interp, *script;  /* char *: they end in execvp's argv */
  char **iflags;  /* interpreter flags (combined word) */
  int niflags;
  char **exec_argv;  /* INTERP, FLAGS..., SCRIPT, ARGS */
  const char *ident;
  struct utsname uts;
  char *run_base, *socket_path, *lock_path;
  struct sockaddr_un addr;
  struct stat initial_stab;  /* the socket a new server listens on */
} client;

extern client cl;


/* msg.c */
void die (const char *fmt, ...) CL_PRINTF(1, 2) CL_NORETURN;
void diee (const char *fmt, ...) CL_PRINTF(1, 2) CL_NORETURN;
void warning (const char *fmt, ...) CL_PRINTF(1, 2);
void usage (FILE *f);
void badusage (const char *fmt, ...) CL_PRINTF(1, 2) CL_NORETURN;
void *xmalloc (size_t n);
char *xasprintf (const char *fmt, ...) CL_PRINTF(1, 2);

/* args.c */
void parse_args (char **argv);
void ident_string (char key, const char *s);
void ident_digest (unsigned char *h, size_t n);

/* rundir.c */
void find_socket_path (void);
int same_inode (const struct stat *a, const struct stat *b);
int flock_file (const char *path);
void preclean (void);

/* call.c */
int call_connect (void);
void call_send (int sock);
int call_greeting (int fd);
int call_status (int sock);
void propagate (int status, const char *what) CL_NORETURN;

/* spawn.c */
int spawn (int lockfd);

#endif
