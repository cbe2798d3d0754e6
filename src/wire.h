/*
** wire.h: byte-level encodings shared by prefork.core and the lua-prefork
** command. Plain C99: no Lua, no libev, so that the static client
** compiles it too.
*/

#if !defined(wire_h)
#define wire_h

#include <stddef.h>
#include <stdint.h>

#include <sys/socket.h>
#include <sys/uio.h>


/* a big-endian u32: the length and status fields of every wire here */
static inline void pf_put32 (unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}


static inline uint32_t pf_get32 (const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8
         | (uint32_t)p[3];
}


/* {======================================================
** wire.c: the prefork-interp wire (chiark-utils 7.0.0), both halves of
** each message side by side; pure functions (no I/O), fuzzed.
**
** A call, on the accepted connection (or the wrapper's first socketpair):
**   S->C  the greeting: "PFI\n", a u32 XLEN, XLEN bytes (servers send 0)
**   C->S  the signalling byte, 0
**   C->S  three messages of one byte each carrying one fd (SCM_RIGHTS):
**         the caller's fds 0, 1, 2
**   C->S  a u32 length, then the request: the environment (NAME=value
**         strings), an empty string, argv (INTERP, SCRIPT, ARGS); each
**         string NUL-terminated
**   C->S  (lua-prefork's extension) one byte per forwarded signal
**   S->C  the executor's wait status as a u32
** Every u32 is big-endian. The wrapper hands its server the listening
** socket and the rest in PREFORK_INTERP (see pf_ienv_parse).
** ======================================================= */

#if defined(__GNUC__)
#define PF_WIRE	__attribute__((visibility("hidden"))) extern
#else
#define PF_WIRE	extern
#endif

#define PF_GREETLEN	8  /* the greeting a server sends */
#define PF_SIGBYTE	0  /* the only signalling byte there is */

/* longest request (environment and argv) a server accepts */
#if !defined(PF_MAXREQ)
#define PF_MAXREQ	(1024 * 1024)
#endif
/* most greeting extra data a client accepts */
#if !defined(PF_MAXXLEN)
#define PF_MAXXLEN	65536
#endif

/* what pf_greet_parse says of the bytes received so far */
#define PF_GREET_OK	0  /* complete: *want bytes are the whole greeting */
#define PF_GREET_MORE	1  /* *want bytes are needed */
#define PF_GREET_BADMAGIC	2
#define PF_GREET_TOOBIG	3  /* XLEN over PF_MAXXLEN */

PF_WIRE size_t pf_greet_encode (unsigned char *buf);
PF_WIRE int pf_greet_parse (const unsigned char *buf, size_t len,
                            size_t *want);

/* PREFORK_INTERP: "v1,SECS.NSECS[,...] LISTEN,CALL,WATCHI,WATCHE[...]" */
typedef struct pf_ienv {
  long long sec;  /* the socket's mtime: the autoreload baseline */
  long nsec;
  int fd[4];  /* LISTEN, CALL, WATCHI, WATCHE */
} pf_ienv;

#define PF_IENVLEN	96  /* room for any value pf_ienv_format writes */

PF_WIRE int pf_ienv_format (char *buf, size_t size, const pf_ienv *e);
PF_WIRE const char *pf_ienv_parse (const char *s, pf_ienv *e);

/* a parsed request: pointers into its buffer */
typedef struct pf_req {
  char **env, **argv;  /* NULL-terminated; env owns the one allocation */
  int nenv, nargv;
} pf_req;

PF_WIRE size_t pf_req_size (char *const *env, char *const *argv);
PF_WIRE void pf_req_encode (unsigned char *out, char *const *env,
                            char *const *argv, size_t len);
PF_WIRE const char *pf_req_len (const unsigned char *b, size_t *len);
PF_WIRE const char *pf_req_parse (char *buf, size_t len, pf_req *r);

/* one byte with one fd: the message that carries each of fds 0, 1, 2 */
typedef union pf_fdctl {
  size_t align;  /* (a struct cmsghdr's; it has a flexible array) */
  char buf[CMSG_SPACE(sizeof(int))];
} pf_fdctl;

PF_WIRE void pf_fdmsg_build (struct msghdr *m, struct iovec *iov,
                             pf_fdctl *ctl, unsigned char *byte, int fd);
PF_WIRE int pf_fdmsg_fd (struct msghdr *m);

/* the status: a raw wait status */
PF_WIRE void pf_status_encode (unsigned char *b, int status);
PF_WIRE int pf_status_decode (const unsigned char *b, int *status);
/* }====================================================== */

#endif
