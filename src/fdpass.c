/*
** fdpass.c: SCM_RIGHTS over Unix sockets, and peer credentials.
**
** On a stream socket bytes have no boundaries, so each message is framed:
** a 4-byte big-endian length, then the data; the fds ride on the first
** byte of the frame. recvfds reads one whole frame and returns its data
** with the fds that came with it.
*/

#include <errno.h>
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


/* prefork.sendfds(sock, data, fds) -> true | nil, "timeout" | fail */
static int l_sendfds (lua_State *L) {
  pf_conn *c;
  int sock = checksock(L, &c);
  size_t len, sent = 0;
  const char *data = luaL_checklstring(L, 2, &len);
  int n, i, fds[MAXFDS];
  unsigned char head[HEADER];
  union {  /* aligned control buffer */
    char buf[CMSG_SPACE(sizeof(int) * MAXFDS)];
    struct cmsghdr align;
  } ctl;
  struct iovec iov[2];
  struct msghdr msg;
  double dl = pf_deadline(c != NULL ? c->timeout : -1);
  luaL_checktype(L, 3, LUA_TTABLE);
  n = (int)luaL_len(L, 3);
  luaL_argcheck(L, n <= MAXFDS, 3, "more than 253 fds");
  luaL_argcheck(L, len <= PF_MAXFDMSG, 2, "data too long");
  for (i = 0; i < n; i++) {
    lua_geti(L, 3, i + 1);
    fds[i] = pf_tofd(L, -1);
    lua_pop(L, 1);
  }
  pf_put32(head, (uint32_t)len);
  memset(&msg, 0, sizeof(msg));
  iov[0].iov_base = head; iov[0].iov_len = HEADER;
  iov[1].iov_base = (void *)(size_t)data; iov[1].iov_len = len;
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  if (n > 0) {
    struct cmsghdr *cm;
    memset(&ctl, 0, sizeof(ctl));
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n);
  }
  while (sent < HEADER + len) {
    ssize_t k = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (k > 0) {
      size_t left = (size_t)k;
      sent += left;
      msg.msg_control = NULL;  /* the fds went with the first byte */
      msg.msg_controllen = 0;
      while (msg.msg_iovlen > 0 && left >= msg.msg_iov[0].iov_len) {
        left -= msg.msg_iov[0].iov_len;
        msg.msg_iov++;
        msg.msg_iovlen--;
      }
      if (msg.msg_iovlen > 0) {
        msg.msg_iov[0].iov_base = (char *)msg.msg_iov[0].iov_base + left;
        msg.msg_iov[0].iov_len -= left;
      }
    }
    else if (k < 0 && errno == EINTR)
      continue;
    else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!pf_waitfd(sock, POLLOUT, dl)) {
        luaL_pushfail(L);
        lua_pushliteral(L, "timeout");
        return 2;
      }
    }
    else
      return pf_fail(L, "sendmsg");
  }
  lua_pushboolean(L, 1);
  return 1;
}


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
** Receive exactly len bytes into buf, and the fds that come with them.
** 1 done (*trunc set when more fds came than maxfds, or the kernel cut
** the control data), 0 end of stream, -1 errno (ETIMEDOUT).
*/
static int recvall (int sock, char *buf, size_t len, int *fds, int *nfds,
                    int maxfds, int *trunc, double dl) {
  size_t got = 0;
  union {
    char buf[CMSG_SPACE(sizeof(int) * MAXFDS)];
    struct cmsghdr align;
  } ctl;
  while (got < len) {
    struct msghdr msg;
    struct iovec iov;
    ssize_t k;
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = buf + got;
    iov.iov_len = len - got;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(maxfds > 0 ? maxfds : 1));
    k = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (k > 0) {
      *nfds += takefds(&msg, fds + *nfds, MAXFDS - *nfds);
      if ((msg.msg_flags & MSG_CTRUNC) || *nfds > maxfds)
        *trunc = 1;  /* read on: the next frame must start in place */
      got += (size_t)k;
    }
    else if (k == 0)
      return 0;
    else if (errno == EINTR)
      continue;
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
      return -1;
    else if (!pf_waitfd(sock, POLLIN, dl)) {
      errno = ETIMEDOUT;
      return -1;
    }
  }
  return 1;
}


/* received fds not yet handed to Lua: a box whose __gc closes them, so
** that not even a memory error between two steps can leak one */
typedef struct fdbox {
  int n;
  int fds[MAXFDS];
} fdbox;

#define FDBOX	"prefork.fdbox"

static int box_gc (lua_State *L) {
  fdbox *box = (fdbox *)luaL_checkudata(L, 1, FDBOX);
  closefds(box->fds, box->n);
  box->n = 0;
  return 0;
}


/* a failed recvfds: what came is closed; nil, reason */
static int recvfail (lua_State *L, int st, fdbox *box) {
  int en = errno;
  closefds(box->fds, box->n);
  box->n = 0;
  errno = en;
  luaL_pushfail(L);
  if (st == 0 || (st < 0 && errno == ECONNRESET))
    lua_pushliteral(L, "closed");
  else if (errno == ETIMEDOUT)
    lua_pushliteral(L, "timeout");
  else if (errno == EMSGSIZE)
    lua_pushliteral(L, "truncated");
  else if (errno == EPROTO)
    lua_pushliteral(L, "corrupt message");
  else {
    lua_pop(L, 1);
    return pf_fail(L, "recvmsg");
  }
  return 2;
}


static int l_recvfds (lua_State *L);

/* recvfds again once the socket is readable (or the time is up) */
static int recvfds_k (lua_State *L, int status, lua_KContext ctx) {
  (void)status; (void)ctx;
  if (pf_wakereason(L) == PF_TIMEOUT) {
    luaL_pushfail(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  return l_recvfds(L);
}


/*
** prefork.recvfds(sock [, maxfds]) -> data, fds | nil, "closed" |
** nil, "truncated" | nil, "timeout" | nil, "corrupt message" | fail.
** Every fd received is close-on-exec; on any failure those that came are
** closed: none leaks.
*/
static int l_recvfds (lua_State *L) {
  pf_conn *c;
  int sock = checksock(L, &c);
  lua_Integer maxfds = luaL_optinteger(L, 2, 16);
  unsigned char head[HEADER];
  size_t len;
  double dl = pf_deadline(c != NULL ? c->timeout : -1);
  luaL_Buffer b;
  fdbox *box;
  char *p;
  int st, i, trunc = 0;
  luaL_argcheck(L, maxfds >= 0 && maxfds <= MAXFDS, 2, "from 0 to 253");
  lua_settop(L, 2);
  {  /* nothing there yet: wait for it (a serve coroutine yields) */
    struct pollfd pf;
    pf.fd = sock;
    pf.events = POLLIN;
    if (poll(&pf, 1, 0) == 0
        && pf_waitk(L, sock, POLLIN, dl, 0, 0, recvfds_k) == PF_TIMEOUT) {
      luaL_pushfail(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
  }
  box = (fdbox *)lua_newuserdatauv(L, sizeof(fdbox), 0);
  box->n = 0;
  luaL_setmetatable(L, FDBOX);
  st = recvall(sock, (char *)head, HEADER, box->fds, &box->n, (int)maxfds,
               &trunc, dl);
  if (st <= 0) return recvfail(L, st, box);
  len = pf_get32(head);
  if (len > PF_MAXFDMSG) {
    errno = EPROTO;
    return recvfail(L, -1, box);
  }
  p = luaL_buffinitsize(L, &b, len);
  st = recvall(sock, p, len, box->fds, &box->n, (int)maxfds, &trunc, dl);
  if (st <= 0 && len > 0) return recvfail(L, st, box);
  if (trunc) {
    errno = EMSGSIZE;
    return recvfail(L, -1, box);
  }
  luaL_pushresultsize(&b, len);
  lua_createtable(L, box->n, 0);
  for (i = 0; i < box->n; i++) {
    lua_pushinteger(L, box->fds[i]);
    lua_rawseti(L, -2, i + 1);
  }
  box->n = 0;  /* handed over */
  return 2;
}


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
  luaL_newmetatable(L, FDBOX);
  lua_pushcfunction(L, box_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
