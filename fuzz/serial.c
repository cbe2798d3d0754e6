/*
** fuzz/serial.c: libFuzzer target for prefork.decode, the serialiser's
** decoder (the pool's messages). Any input either decodes or raises
** "corrupt message: ..."; what decodes encodes again and decodes to the
** same values; core.decodeinto agrees on the count, and core.encodelist
** of a part of the list holds what it says.
*/

#define HARNESS \
  "local core = require 'prefork.core'\n" \
  "local function same (a, b) return a == b or (a ~= a and b ~= b) end\n" \
  "return function (data)\n" \
  "  local r = table.pack(pcall(core.decode, data))\n" \
  "  if not r[1] then\n" \
  "    assert(r[2]:find('corrupt message', 1, true) or r[2]:find('too many', 1, true), r[2])\n" \
  "    return\n" \
  "  end\n" \
  "  local again = core.encode(table.unpack(r, 2, r.n))\n" \
  "  local r2 = table.pack(core.decode(again))\n" \
  "  assert(r2.n == r.n - 1, 'count')\n" \
  "  for i = 1, r2.n do\n" \
  "    if type(r2[i]) ~= 'table' then assert(same(r2[i], r[i + 1]), 'value') end\n" \
  "  end\n" \
  "  local n, t = core.decodeinto(data, nil, 0)\n" \
  "  assert(n == r2.n, 'decodeinto count')\n" \
  "  local part, k = core.encodelist(t, 1, n, #data // 2)\n" \
  "  assert(k <= n and (k >= 1 or n == 0), 'encodelist range')\n" \
  "  assert(select('#', core.decode(part)) == k, 'encodelist count')\n" \
  "end\n"

#include "fuzz.h"


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  if (size > 65536) return 0;
  fuzz_push();
  lua_pushlstring(L, (const char *)data, size);
  fuzz_call(1, "decode");
  return 0;
}
