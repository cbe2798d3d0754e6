/*
** lua-prefork: the client command (wrapper) of prefork-interp for Lua.
** Speaks the protocol of chiark-utils' prefork-interp 7.0.0 (the wire is
** src/wire.c; docs/interp.md tells the rest): same options, run
** directory, ident hash, lock, sockets and wire, so that this wrapper and
** Debian's /usr/bin/prefork-interp reach each other's servers.
**
**   lua-prefork [OPTIONS] SCRIPT [ARGS]          is exactly -U LUA (the Lua
**                                                this was built for)
**   lua-prefork -U [OPTIONS] INTERP SCRIPT [ARGS]
**   #!/usr/bin/lua-prefork -U,INTERP[,FLAG...]   the combined first word
**
** Beyond Debian's wrapper:
**  - Interpreter flags in the combined word: "-U,lua5.4,-W" runs
**    "lua5.4 -W SCRIPT ARGS". Each flag enters the ident as an item 'f'
**    FLAG NUL between the 'i' INTERP and the 's' SCRIPT items (so without
**    flags the ident is Debian's), and the server's argv is INTERP,
**    FLAGS..., SCRIPT, ARGS (the same as the executor argv).
**  - The server must run as our uid or as root (SO_PEERCRED), else it is
**    refused before anything is sent to it.
**  - The request goes without waiting for the greeting (call.c).
**  - Signals: while waiting for the status, INT, TERM, HUP, QUIT, USR1,
**    USR2 and WINCH (those the caller did not leave ignored) are forwarded
**    as one byte each, the signal number, on the call connection. A
**    lua-prefork server signals the executor's process group; a Perl
**    server sees the connection readable and sends SIGINT (the documented
**    degradation).
**  - A call that died of signal N makes this process die of N too (with
**    core dumps of our own disabled); if N does not kill (e.g. WINCH), it
**    exits 128+N.
**  - The run directory must be a directory (not a symlink) owned by us,
**    mode & 077 == 0, or we refuse it.
**  - SETUP and the watcher get only the fds the protocol names.
**  - The greeting's extra data may be at most PF_MAXXLEN bytes; its
**    length is read big-endian like every other length (servers send 0).
**  - Preclean removes only the oldest idents beyond MAXSOCKETS.
** Errors exit 127 with "lua-prefork: MSG[: strerror]"; bad usage 255.
*/

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "client.h"


/* the protocol needs fds 0 1 2: a closed one becomes /dev/null */
static void open_std (void) {
  int fd;
  for (fd = 0; fd < 3; fd++)
    if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
      diee("open /dev/null for fd %d", fd);
}


/* a call socket with the request sent and the greeting read: to the
** running server, or else to a new one (under the lock); --kill ends
** here */
static int connect_or_spawn (void) {
  int fd = call_connect(), lockfd;
  if (fd >= 0) return fd;
  preclean();
  lockfd = flock_file(cl.lock_path);
  if (cl.mode == 'k') {
    if (unlink(cl.socket_path) != 0 && errno != ENOENT)
      diee("remove socket %s", cl.socket_path);
    if (unlink(cl.lock_path) != 0) diee("remove lock %s", cl.lock_path);
    exit(0);
  }
  fd = call_connect();
  if (fd >= 0) { close(lockfd); return fd; }
  return spawn(lockfd);
}


int main (int argc, char **argv) {
  (void)argc;
  open_std();
  parse_args(argv);
  find_socket_path();
  propagate(call_status(connect_or_spawn()), "invocation");
  return 127;
}
