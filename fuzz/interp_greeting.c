/*
** fuzz/interp_greeting.c: libFuzzer target for the client's greeting
** parser (pf_greet_parse, src/wire.c: "PFI\n", a big-endian XLEN, XLEN
** bytes of extra data). The first input byte sets the size of the reads
** the rest arrives in, as from a socket; after each read the parser's
** answer must agree with the bytes seen, and it must never look past
** them (ASan watches the exact-size input).
*/

#include <stdlib.h>
#include <string.h>

#include "../src/wire.h"

int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);

static const unsigned char magic[4] = {'P', 'F', 'I', '\n'};


static void check (const unsigned char *p, size_t have, size_t want, int st) {
  size_t m = have < 4 ? have : 4;
  switch (st) {
    case PF_GREET_MORE:
      if (memcmp(p, magic, m) != 0 || want <= have || want > 8 + PF_MAXXLEN)
        abort();
      break;
    case PF_GREET_OK:
      if (memcmp(p, magic, 4) != 0 || have < 8 || want > have ||
          want != 8 + (size_t)pf_get32(p + 4))
        abort();
      break;
    case PF_GREET_BADMAGIC:
      if (memcmp(p, magic, m) == 0) abort();
      break;
    case PF_GREET_TOOBIG:
      if (have < 8 || pf_get32(p + 4) <= PF_MAXXLEN) abort();
      break;
    default: abort();
  }
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  size_t have = 0, want = 8, step;
  int st = PF_GREET_MORE;
  if (size < 1) return 0;
  step = (size_t)data[0] % 16 + 1;
  data++; size--;
  while (st == PF_GREET_MORE && have < size) {
    size_t n = want - have;
    unsigned char *copy;
    if (n > step) n = step;
    if (n > size - have) n = size - have;
    have += n;
    copy = (unsigned char *)malloc(have);  /* exactly what was read */
    memcpy(copy, data, have);
    st = pf_greet_parse(copy, have, &want);
    check(copy, have, want, st);
    free(copy);
  }
  return 0;
}
