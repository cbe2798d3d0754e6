/*
** fuzz/fd_frame.c: libFuzzer target for the framing of prefork.recvfds.
** The input is cut into writes, each with 0 to 3 fds attached (copies
** of /dev/null), sent raw with sendmsg into one end of a socket pair;
** recvfds then reads frames from the other end until it says no more.
** It must never crash, and no fd may be left open afterwards: those it
** returns are closed by the harness, the others by recvfds itself.
*/

#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#define HARNESS \
  "local core = require 'prefork.core'\n" \
  "return function (fd, maxfds)\n" \
  "  local b = core.conn(fd)\n" \
  "  for _ = 1, 1000 do\n" \
  "    local data, fds = core.recvfds(b, maxfds)\n" \
  "    if not data then\n" \
  "      assert(fds == 'closed' or fds == 'truncated' or fds == 'corrupt message', fds)\n" \
  "      if fds ~= 'truncated' then break end\n" \
  "    else\n" \
  "      assert(#fds <= maxfds)\n" \
  "      for _, f in ipairs(fds) do assert(core.close(f)) end\n" \
  "    end\n" \
  "  end\n" \
  "  b:close()\n" \
  "end\n"

#include "fuzz.h"

static int devnull = -1;


static int openfds (void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  if (d == NULL) abort();
  while ((e = readdir(d)) != NULL) n++;
  closedir(d);
  return n;
}


/* one raw write of n bytes with k copies of /dev/null attached */
static void rawsend (int sock, const unsigned char *p, size_t n, int k) {
  union { char buf[CMSG_SPACE(sizeof(int) * 3)]; struct cmsghdr a; } ctl;
  struct msghdr msg;
  struct iovec iov;
  int fds[3] = {devnull, devnull, devnull};
  memset(&msg, 0, sizeof(msg));
  iov.iov_base = (void *)(size_t)p;
  iov.iov_len = n;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (k > 0 && n > 0) {
    struct cmsghdr *cm;
    memset(&ctl, 0, sizeof(ctl));
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)k);
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)k);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)k);
  }
  if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) abort();
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  int sv[2], before, writes = 0;
  size_t pos = 1;
  if (size < 1 || size > 4096) return 0;
  if (devnull < 0) devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  before = openfds();
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) abort();
  while (pos < size && writes++ < 64) {  /* 64 writes fit the buffer */
    int k = data[pos] & 3;
    size_t n = (size_t)(data[pos] >> 2);
    pos++;
    if (n > size - pos) n = size - pos;
    rawsend(sv[0], data + pos, n, k);
    pos += n;
  }
  close(sv[0]);
  fuzz_push();
  lua_pushinteger(L, sv[1]);
  lua_pushinteger(L, data[0] % 5);
  fuzz_call(2, "recvfds");
  if (openfds() != before) {
    fprintf(stderr, "recvfds leaked %d fds\n", openfds() - before);
    abort();
  }
  return 0;
}
