/*
** fuzz/conn_read.c: libFuzzer target for a connection's read buffer. The
** first bytes of the input choose a sequence of read formats ("l", "L",
** "a", sizes) and a line limit; the rest is the stream, written in chunks
** of input-chosen sizes (32 at most). Each read must return what the formats promise,
** and the concatenation of what was read must be a prefix of the stream.
*/

#define HARNESS \
  "local core = require 'prefork.core'\n" \
  "local formats = {'l', 'L', 'a', 0, 1, 7, 100, 5000}\n" \
  "return function (data)\n" \
  "  if #data < 4 then return end\n" \
  "  local nops, limit = data:byte(1) % 16, data:byte(2) * 4\n" \
  "  local ops = data:sub(3, 2 + nops)\n" \
  "  local stream = data:sub(3 + nops)\n" \
  "  local a, b = core.socketpair()\n" \
  "  b:setmaxline(limit > 0 and limit or nil)\n" \
  "  local pos, chunks = 1, 0\n" \
  "  while pos <= #stream do\n" \
  "    chunks = chunks + 1  -- at most 32 writes: they fit the socket buffer\n" \
  "    local n = chunks < 32 and (stream:byte(pos) % 64) + 1 or #stream\n" \
  "    assert(a:write(stream:sub(pos, pos + n - 1)))\n" \
  "    pos = pos + n\n" \
  "  end\n" \
  "  a:close()\n" \
  "  local got = {}\n" \
  "  for i = 1, #ops do\n" \
  "    local f = formats[ops:byte(i) % #formats + 1]\n" \
  "    local r, err = b:read(f)\n" \
  "    if r then\n" \
  "      if f == 'l' then assert(not r:find('\\n', 1, true)) r = r .. '\\n' end\n" \
  "      if type(f) == 'number' then assert(#r <= f) end\n" \
  "      got[#got + 1] = r\n" \
  "    else\n" \
  "      assert(err == 'closed' or err == 'too long', err)\n" \
  "    end\n" \
  "  end\n" \
  "  b:close()\n" \
  "  local all = table.concat(got)\n" \
  "  -- 'l' adds back a newline that may not have been there at the end\n" \
  "  local s = stream .. '\\n'\n" \
  "  assert(s:sub(1, #all) == all or stream:sub(1, #all) == all, 'not a prefix')\n" \
  "end\n"

#include "fuzz.h"


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  if (size > 65536) return 0;  /* one socket buffer: the writes cannot block */
  fuzz_push();
  lua_pushlstring(L, (const char *)data, size);
  fuzz_call(1, "conn:read broke its promise");
  return 0;
}
