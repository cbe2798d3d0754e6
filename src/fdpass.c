/*
** fdpass.c: SCM_RIGHTS over Unix sockets, and peer credentials.
**
** On a stream socket bytes have no boundaries, so each message is framed:
** a 4-byte big-endian length, then the data; the fds ride on the first
** byte of the frame. recvfds reads one whole frame and returns its data
** with the fds that came with it.
*/

#include <errno.h>
#include <stddef.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "prefork.h"
#include "wire.h"


/* most data in one message: a longer frame is refused as corrupt */
#if !defined(PF_MAXFDMSG)
#define PF_MAXFDMSG	(16 * 1024 * 1024)
#endif

#define MAXFDS	253  /* SCM_MAX_FD: the kernel's limit per message */
#define HEADER	4


/* the socket argument, and its connection object if it is one */
static int checksock (lua_State *L, pf_conn **c) {
  *c = (pf_conn *)luaL_testudata(L, 1, PF_CONN);
  if (*c != NULL)
    luaL_argcheck(L, (*c)->r == (*c)->w, 1,
                  "connection has buffered data (read with conn:read)");
  return pf_tofd(L, 1);
}


/* {======================================================
** Sending a frame
** ======================================================= */

/* an aligned control buffer for up to MAXFDS fds */
typedef union ctlbuf {
  char buf[CMSG_SPACE(sizeof(int) * MAXFDS)];
  struct cmsghdr align;
} ctlbuf;


/* the fds of the list at 3 as control data of msg */
static void putfds (lua_State *L, struct msghdr *msg, ctlbuf *ctl) {
  int i, n = (int)luaL_len(L, 3);
  struct cmsghdr *cm;
  int fds[MAXFDS];
  if (n == 0) return;
  for (i = 0; i < n; i++) fds[i] = pf_tofdin(L, 3, i + 1, 3);
  memset(ctl, 0, sizeof(*ctl));
  msg->msg_control = ctl->buf;
  msg->msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
  cm = CMSG_FIRSTHDR(msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
  memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n);
}


/* send what is left of the frame (header and the data at 2) from byte
** sent on; the fds go with the first byte: the bytes sent, or -1 */
static ssize_t sendrest (lua_State *L, int sock, size_t sent) {
  size_t len, h = sent < HEADER ? HEADER - sent : 0;
  const char *data = lua_tolstring(L, 2, &len);
  unsigned char head[HEADER];
  struct iovec iov[2];
  struct msghdr msg;
  ctlbuf ctl;
  ssize_t k;
  pf_put32(head, (uint32_t)len);
  memset(&msg, 0, sizeof(msg));
  iov[0].iov_base = head + (HEADER - h);
  iov[0].iov_len = h;
  iov[1].iov_base = (char *)(size_t)data + (sent - (HEADER - h));
  iov[1].iov_len = len - (sent - (HEADER - h));
  msg.msg_iov = h > 0 ? iov : iov + 1;
  msg.msg_iovlen = h > 0 ? 2 : 1;
  if (sent == 0) putfds(L, &msg, &ctl);
  do k = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (k < 0 && errno == EINTR);
  return k;
}


static int sendloop (lua_State *L, size_t sent);

static int sendfds_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  if (pf_wakereason(L) != PF_READY)
    return pf_failwith(L, "timeout", ETIMEDOUT);
  return sendloop(L, (size_t)ctx);
}


/* the frame of the arguments (sock, data, fds, deadline at 4) from byte
** sent on; waits (or yields) while the socket is full */
static int sendloop (lua_State *L, size_t sent) {
  int sock = pf_tofd(L, 1);
  size_t len = HEADER + luaL_len(L, 2);
  while (sent < len) {
    ssize_t k = sendrest(L, sock, sent);
    if (k >= 0)
      sent += (size_t)k;
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
      return pf_fail(L, "sendmsg");
    else if (pf_waitk(L, sock, POLLOUT, lua_tonumber(L, 4), 0,
                      (lua_KContext)sent, sendfds_k) != PF_READY)
      return pf_failwith(L, "timeout", ETIMEDOUT);
  }
  lua_pushboolean(L, 1);
  return 1;
}


/* prefork.sendfds(sock, data, fds) -> true | nil, "timeout" | fail; in a
** task it yields while the socket is full */
static int l_sendfds (lua_State *L) {
  pf_conn *c;
  int i, n;
  size_t len;
  checksock(L, &c);
  luaL_checklstring(L, 2, &len);
  luaL_checktype(L, 3, LUA_TTABLE);
  n = (int)luaL_len(L, 3);
  luaL_argcheck(L, n <= MAXFDS, 3, "more than 253 fds");
  luaL_argcheck(L, len <= PF_MAXFDMSG, 2, "data too long");
  for (i = 1; i <= n; i++) pf_tofdin(L, 3, i, 3);  /* all, before a byte */
  lua_settop(L, 3);
  lua_pushnumber(L, pf_deadline(c != NULL ? c->timeout : -1));
  return sendloop(L, 0);
}

/* }====================================================== */


/* {======================================================
** Receiving a frame
** ======================================================= */

/* close the n fds of a control message */
static void closefds (const int *fds, int n) {
  int i;
  for (i = 0; i < n; i++) close(fds[i]);
}


/* the fds in msg's control data into fds[]; their number */
static int takefds (struct msghdr *msg, int *fds, int max) {
  struct cmsghdr *cm;
  int n = 0;
  for (cm = CMSG_FIRSTHDR(msg); cm != NULL; cm = CMSG_NXTHDR(msg, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      int room = max - n;
      if (k > room) {  /* cannot be: the buffer holds max. Close them. */
        int extra[MAXFDS];
        memcpy(extra, CMSG_DATA(cm), sizeof(int) * (size_t)k);
        closefds(extra, k);
        continue;
      }
      memcpy(fds + n, CMSG_DATA(cm), sizeof(int) * (size_t)k);
      n += k;
    }
  }
  return n;
}


/*
** A frame on its way in, kept across the waits of recvfds: a userdata
** whose __gc closes the fds that came and frees the data, so that no
** failure (nor a memory error between two steps) leaks one.
*/
typedef struct frame {
  int n;  /* fds received */
  int maxfds;
  int trunc;  /* more fds came than maxfds, or the kernel cut some */
  unsigned char head[HEADER];
  size_t got;  /* bytes of the frame received (header and data) */
  size_t len;  /* of the data, once the header is in */
  char *data;
  int fds[MAXFDS];
} frame;

#define FRAME	"prefork.frame"

static int frame_gc (lua_State *L) {
  frame *f = (frame *)luaL_checkudata(L, 1, FRAME);
  closefds(f->fds, f->n);
  f->n = 0;
  free(f->data);
  f->data = NULL;
  return 0;
}


/* receive more of frame f, without blocking: the bytes, 0 at end of
** stream, -1 with errno */
static ssize_t recvsome (int sock, frame *f) {
  ctlbuf ctl;
  struct msghdr msg;
  struct iovec iov;
  ssize_t k;
  memset(&msg, 0, sizeof(msg));
  if (f->got < HEADER) {
    iov.iov_base = f->head + f->got;
    iov.iov_len = HEADER - f->got;
  }
  else {
    iov.iov_base = f->data + (f->got - HEADER);
    iov.iov_len = f->len - (f->got - HEADER);
  }
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl.buf;
  msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(f->maxfds > 0
                                                          ? f->maxfds : 1));
  do k = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  while (k < 0 && errno == EINTR);
  if (k > 0) {
    f->n += takefds(&msg, f->fds + f->n, MAXFDS - f->n);
    if ((msg.msg_flags & MSG_CTRUNC) || f->n > f->maxfds)
      f->trunc = 1;  /* read on: the next frame must start in place */
  }
  return k;
}


/* the header is in: room for the data; 0 when its length is absurd */
static int gothead (frame *f) {
  f->len = pf_get32(f->head);
  if (f->len > PF_MAXFDMSG) return 0;
  f->data = (char *)malloc(f->len + 1);
  return f->data != NULL;
}


/* a whole frame: data, fds (handed over to Lua) */
static int delivered (lua_State *L, frame *f) {
  int i;
  if (f->trunc) return pf_failwith(L, "truncated", EMSGSIZE);
  lua_pushlstring(L, f->data, f->len);
  lua_createtable(L, f->n, 0);
  for (i = 0; i < f->n; i++) {
    lua_pushinteger(L, f->fds[i]);
    lua_rawseti(L, -2, i + 1);
  }
  f->n = 0;  /* handed over */
  return 2;
}


static int recvloop (lua_State *L);

static int recvfds_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  if (pf_wakereason(L) != PF_READY)
    return pf_failwith(L, "timeout", ETIMEDOUT);
  return recvloop(L);
}


/* receive the frame at 4 (deadline at 3), waiting (or yielding) while
** nothing is there */
static int recvloop (lua_State *L) {
  int sock = pf_tofd(L, 1);
  frame *f = (frame *)lua_touserdata(L, 4);
  while (f->got < HEADER + f->len || f->got < HEADER) {
    ssize_t k = recvsome(sock, f);
    if (k > 0) {
      f->got += (size_t)k;
      if (f->got == HEADER && !gothead(f))
        return f->len > PF_MAXFDMSG ? pf_failwith(L, "corrupt message", EPROTO)
                                    : pf_failwith(L, "not enough memory",
                                                  ENOMEM);
    }
    else if (k == 0 || errno == ECONNRESET)
      return pf_failwith(L, "closed", 0);
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
      return pf_fail(L, "recvmsg");
    else if (pf_waitk(L, sock, POLLIN, lua_tonumber(L, 3), 0, 0,
                      recvfds_k) != PF_READY)
      return pf_failwith(L, "timeout", ETIMEDOUT);
  }
  return delivered(L, f);
}


/*
** prefork.recvfds(sock [, maxfds]) -> data, fds | nil, why, errno: why
** "closed", "truncated", "timeout", "corrupt message" or "recvmsg: ...".
** Every fd received is close-on-exec; on any failure those that came are
** closed: none leaks. In a task it yields whenever it must wait, also in
** the middle of a frame.
*/
static int l_recvfds (lua_State *L) {
  pf_conn *c;
  lua_Integer maxfds = luaL_optinteger(L, 2, 16);
  frame *f;
  checksock(L, &c);
  luaL_argcheck(L, maxfds >= 0 && maxfds <= MAXFDS, 2, "from 0 to 253");
  lua_settop(L, 2);
  lua_pushnumber(L, pf_deadline(c != NULL ? c->timeout : -1));
  f = (frame *)lua_newuserdatauv(L, sizeof(frame), 0);
  memset(f, 0, offsetof(frame, fds));
  f->maxfds = (int)maxfds;
  luaL_setmetatable(L, FRAME);
  return recvloop(L);
}

/* }====================================================== */


/* {======================================================
** One connection at a time (accept = "master"): one byte, one fd
** ======================================================= */

static void onefd (struct msghdr *msg, struct iovec *iov, void *data,
                   size_t n, char *ctl, size_t ctllen) {
  memset(msg, 0, sizeof(*msg));
  memset(ctl, 0, ctllen);
  iov->iov_base = data;
  iov->iov_len = n;
  msg->msg_iov = iov;
  msg->msg_iovlen = 1;
  msg->msg_control = ctl;
  msg->msg_controllen = ctllen;
}


/* send n bytes of data with fd attached (fd < 0: none): the bytes sent,
** or -1 with errno; flags as sendmsg's (MSG_NOSIGNAL is added) */
ssize_t pf_sendfdmsg (int sock, int fd, const void *data, size_t n,
                      int flags) {
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } ctl;
  struct msghdr msg;
  struct iovec iov;
  ssize_t r;
  onefd(&msg, &iov, (void *)(size_t)data, n, ctl.buf, sizeof(ctl.buf));
  if (fd >= 0) {
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  }
  else
    msg.msg_controllen = 0;
  do r = sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
  while (r < 0 && errno == EINTR);
  return r;
}


/* receive up to n bytes and the fd that came with them (*fd, -1 none;
** close-on-exec; an fd that did not fit is closed by the kernel and
** sets *trunc): the bytes, 0 at end of stream, -1 with errno */
ssize_t pf_recvfdmsg (int sock, int *fd, void *data, size_t n, int flags,
                      int *trunc) {
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr a; } ctl;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  ssize_t r;
  onefd(&msg, &iov, data, n, ctl.buf, sizeof(ctl.buf));
  *fd = -1;
  do r = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
  while (r < 0 && errno == EINTR);
  cm = r > 0 ? CMSG_FIRSTHDR(&msg) : NULL;
  if (cm != NULL && cm->cmsg_level == SOL_SOCKET
      && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int)))
    memcpy(fd, CMSG_DATA(cm), sizeof(int));
  if (trunc != NULL) *trunc = r > 0 && (msg.msg_flags & MSG_CTRUNC);
  return r;
}


/* send fd on sock, never blocking: 1 sent, 0 would block (or the peer
** is gone) */
int pf_sendfd (int sock, int fd) {
  return pf_sendfdmsg(sock, fd, "c", 1, MSG_DONTWAIT) == 1;
}


/* receive a byte and the fd that came with it (*fd, -1 none; close-on-
** exec), never blocking: 1, 0 at end of stream, -1 with errno (EAGAIN:
** nothing there) */
int pf_recvfd (int sock, int *fd) {
  char byte;
  return (int)pf_recvfdmsg(sock, fd, &byte, 1, MSG_DONTWAIT, NULL);
}

/* }====================================================== */


/* prefork.peercred(sock) -> pid, uid, gid */
static int l_peercred (lua_State *L) {
  struct ucred cr;
  socklen_t len = sizeof(cr);
  if (getsockopt(pf_tofd(L, 1), SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0)
    return pf_fail(L, "getsockopt");
  if (cr.pid == 0) {  /* not a Unix socket, or no peer */
    errno = ENOTCONN;
    return pf_fail(L, "peercred");
  }
  lua_pushinteger(L, cr.pid);
  lua_pushinteger(L, cr.uid);
  lua_pushinteger(L, cr.gid);
  return 3;
}


void pf_open_fdpass (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"sendfds", l_sendfds},
    {"recvfds", l_recvfds},
    {"peercred", l_peercred},
    {NULL, NULL}
  };
  luaL_newmetatable(L, FRAME);
  lua_pushcfunction(L, frame_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
