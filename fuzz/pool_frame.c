/*
** fuzz/pool_frame.c: libFuzzer target for the pool's channel framing
** (ch:recv in src/pool.c), over a real socketpair: the input, written in
** pieces as the fuzzer's own first byte says, is read back as frames.
** Every frame handed over lies within what was written (or, for kinds
** below 8 on odd steps, comes decoded in place, or says it is corrupt:
** ch:recv's mask); the stream ends
** as "closed" or "corrupt message: ...", never otherwise; nothing leaks.
*/

#define HARNESS \
  "local core = require 'prefork.core'\n" \
  "return function (data)\n" \
  "  local a, b = assert(core.socketpair())\n" \
  "  local ch = assert(core.chan(b))\n" \
  "  local step = 1 + (data:byte(1) or 0) * 7\n" \
  "  local total, pos = 0, 2\n" \
  "  local mask = step % 2 == 0 and 0 or 0xff\n" \
  "  local function onframe (kind, id, s, ...)\n" \
  "    assert(kind >= 0 and kind < 256 and id >= 0 and id < 2^32)\n" \
  "    if kind < 8 and mask ~= 0 then  -- decoded in place\n" \
  "      assert(s == true or (s == false and tostring((...)):find('corrupt', 1, true)))\n" \
  "      return\n" \
  "    end\n" \
  "    total = total + 9 + #s\n" \
  "    assert(total <= #data, 'frames beyond the input')\n" \
  "  end\n" \
  "  local ok, err\n" \
  "  repeat\n" \
  "    if pos <= #data then\n" \
  "      a:write(data:sub(pos, pos + step - 1))\n" \
  "      pos = pos + step\n" \
  "    end\n" \
  "    if pos > #data then a:close() end\n" \
  "    ch:buffered(1 + pos % 9)\n" \
  "    ok, err = ch:recv(onframe, mask)\n" \
  "  until not ok\n" \
  "  assert(err == 'closed' or err:find('^corrupt message'), err)\n" \
  "  ch:close()\n" \
  "  a:close()\n" \
  "end\n"

#include "fuzz.h"


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  if (size > 65536) return 0;
  fuzz_push();
  lua_pushlstring(L, (const char *)data, size);
  fuzz_call(1, "recv");
  return 0;
}
