/*
** fuzz/http_request.c: libFuzzer target for the HTTP request reader of
** examples/http.lua (examples/http_request.lua) over a real connection
** object: the input is written into one end of prefork.socketpair() and
** read back by read_request from the other, through conn:read's buffer.
** read_request must never raise; it returns the request or nil, reason.
** Run from the checkout: make fuzz.
*/

#define HARNESS \
  "package.path = 'examples/?.lua;' .. package.path\n" \
  "local core = require 'prefork.core'\n" \
  "local read_request = require 'http_request'\n" \
  "return function (data)\n" \
  "  local a, b = core.socketpair()\n" \
  "  assert(a:write(data))\n" \
  "  a:close()\n" \
  "  b:settimeout(1)\n" \
  "  local req, err = read_request(b)\n" \
  "  b:close()\n" \
  "  if req then\n" \
  "    assert(type(req.method) == 'string' and type(req.headers) == 'table')\n" \
  "  else\n" \
  "    assert(type(err) == 'string', 'no reason')\n" \
  "  end\n" \
  "end\n"

#include "fuzz.h"


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  if (size > 65536) return 0;  /* one socket buffer: the writes cannot block */
  fuzz_push();
  lua_pushlstring(L, (const char *)data, size);
  fuzz_call(1, "read_request raised");
  return 0;
}
