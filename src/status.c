/*
** status.c: the master's status endpoint (the `status` option): a small
** HTTP/1.0 server on the master's own loop, so that it answers while
** every worker is busy or hung. Each request is read without blocking
** (at most READMAX bytes, within DEADLINE seconds), its path handed to
** the front (opts.status_page(method, path) -> code, type, body), and
** the answer written without blocking; then the connection closes. At
** most MAXCONNS requests are open at once: more are refused.
*/

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include "state.h"


#define READMAX		4096
#define DEADLINE	5.0
#define MAXCONNS	32


typedef struct req {
  struct req *next;
  int fd;
  char in[READMAX];
  size_t got;
  char *out;  /* the answer, once made */
  size_t len, sent;
  ev_io io;
  ev_timer timer;
} req;


static struct {
  master *m;
  pf_listener *l;  /* the listener, NULL none */
  ev_io lw;  /* its watcher */
  req *reqs;
  int nreqs;
} S;


static void endreq (req *r) {
  req **p;
  for (p = &S.reqs; *p != r; p = &(*p)->next) {}
  *p = r->next;
  S.nreqs--;
  ev_io_stop(EV_DEFAULT, &r->io);
  ev_timer_stop(EV_DEFAULT, &r->timer);
  close(r->fd);
  free(r->out);
  free(r);
  if (S.l != NULL && S.nreqs < MAXCONNS) ev_io_start(EV_DEFAULT, &S.lw);
}


/* write what is left of the answer; the request ends when it is out */
static void flush (req *r) {
  while (r->sent < r->len) {
    ssize_t k = send(r->fd, r->out + r->sent, r->len - r->sent,
                     MSG_DONTWAIT | MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ev_io_stop(EV_DEFAULT, &r->io);
      ev_io_set(&r->io, r->fd, EV_WRITE);
      ev_io_start(EV_DEFAULT, &r->io);
      return;
    }
    if (k <= 0) break;
    r->sent += (size_t)k;
  }
  endreq(r);
}


/* the answer: status line, headers and body */
static void answer (req *r, int code, const char *type, const char *body,
                    size_t blen) {
  char head[256];
  int n = snprintf(head, sizeof(head), "HTTP/1.0 %d %s\r\nContent-Type: %s"
                   "\r\nContent-Length: %lu\r\nConnection: close\r\n\r\n",
                   code, code == 200 ? "OK" : code == 404 ? "Not Found"
                   : code == 405 ? "Method Not Allowed" : "Error", type,
                   (unsigned long)blen);
  r->out = (char *)malloc((size_t)n + blen);
  if (r->out == NULL) {
    endreq(r);
    return;
  }
  memcpy(r->out, head, (size_t)n);
  memcpy(r->out + n, body, blen);
  r->len = (size_t)n + blen;
  flush(r);
}


/* the page of the request line "METHOD PATH ..." from the front */
static void page (req *r) {
  lua_State *L = S.m->L;
  char method[16], path[1024];
  const char *type, *body;
  size_t blen;
  int code;
  if (sscanf(r->in, "%15s %1023s", method, path) != 2) {
    answer(r, 400, "text/plain", "bad request\n", 12);
    return;
  }
  if (!pf_pushcb(L, S.m, "status_page")) {
    answer(r, 404, "text/plain", "not found\n", 10);
    return;
  }
  lua_pushstring(L, method);
  lua_pushstring(L, path);
  if (pf_pcall(L, 2, 3) != LUA_OK) {
    pf_log(L, "error", "status: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    answer(r, 500, "text/plain", "error\n", 6);
    return;
  }
  code = (int)lua_tointeger(L, -3);
  type = lua_tostring(L, -2);
  body = lua_tolstring(L, -1, &blen);
  answer(r, code, type != NULL ? type : "text/plain", body != NULL ? body : "",
         body != NULL ? blen : 0);
  lua_pop(L, 3);
}


static void onreq (struct ev_loop *loop, ev_io *io, int revents) {
  req *r = (req *)io->data;
  ssize_t n;
  (void)loop; (void)revents;
  if (r->out != NULL) {  /* writable */
    flush(r);
    return;
  }
  n = recv(r->fd, r->in + r->got, READMAX - 1 - r->got, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    endreq(r);
    return;
  }
  r->got += (size_t)n;
  r->in[r->got] = '\0';
  if (strstr(r->in, "\r\n\r\n") != NULL || strstr(r->in, "\n\n") != NULL
      || r->got == READMAX - 1)
    page(r);
}


static void onslow (struct ev_loop *loop, ev_timer *t, int revents) {
  (void)loop; (void)revents;
  endreq((req *)t->data);
}


static void onaccept (struct ev_loop *loop, ev_io *io, int revents) {
  int i;
  (void)loop; (void)revents;
  for (i = 0; i < 16 && S.nreqs < MAXCONNS; i++) {
    int fd = accept4(io->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    req *r;
    if (fd < 0) return;
    if ((r = (req *)calloc(1, sizeof(req))) == NULL) {
      close(fd);
      return;
    }
    r->fd = fd;
    r->next = S.reqs;
    S.reqs = r;
    S.nreqs++;
    ev_io_init(&r->io, onreq, fd, EV_READ);
    ev_timer_init(&r->timer, onslow, DEADLINE, 0);
    r->io.data = r->timer.data = r;
    ev_io_start(EV_DEFAULT, &r->io);
    ev_timer_start(EV_DEFAULT, &r->timer);
  }
  if (S.nreqs >= MAXCONNS) ev_io_stop(EV_DEFAULT, io);
}


/* serve the status endpoint on listener l (NULL: none) */
void pf_status_start (master *m, pf_listener *l) {
  S.m = m;
  S.l = l;
  if (l == NULL) return;
  ev_io_init(&S.lw, onaccept, pf_listener_fd(l), EV_READ);
  ev_io_start(EV_DEFAULT, &S.lw);
}


/* no more: the requests under way end too */
void pf_status_stop (void) {
  S.l = NULL;
  ev_io_stop(EV_DEFAULT, &S.lw);
  while (S.reqs != NULL) endreq(S.reqs);
}


/* in a new child: nothing of it, not even the listener (the loop's
** watchers go with the loop) */
void pf_status_forget (void) {
  while (S.reqs != NULL) {
    req *r = S.reqs;
    S.reqs = r->next;
    close(r->fd);
    free(r->out);
    free(r);
  }
  if (S.l != NULL) pf_listener_close(S.l);
  memset(&S, 0, sizeof(S));
}
