/*
** fuzz/interp_request.c: libFuzzer target for the prefork-interp request
** parser (pf_interp_parsereq), called directly. Whatever the input, the
** parser must not crash; when it accepts, the strings it returns must
** rebuild the input exactly (environment, the empty string, argv), every
** environment entry must hold '=' and argv must not be empty. Also the
** greeting: always "PFI\n" and a zero length.
*/

#include <stdlib.h>
#include <string.h>

#include "../src/prefork.h"

int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  pf_interp_req r;
  unsigned char g[PF_INTERP_GREETLEN];
  const char *err;
  char *buf, *again;
  size_t pos = 0;
  int i;
  if (pf_interp_greeting(g) != 8 || memcmp(g, "PFI\n\0\0\0\0", 8) != 0)
    abort();
  buf = (char *)malloc(size + 1);
  if (buf == NULL) return 0;
  memcpy(buf, data, size);
  err = pf_interp_parsereq(buf, size, &r);
  if (err != NULL) {
    if (r.env != NULL || r.nenv != 0 || r.nargv != 0) abort();
    free(buf);
    return 0;
  }
  if (r.nargv < 1 || r.env[r.nenv] != NULL || r.argv[r.nargv] != NULL) abort();
  again = (char *)malloc(size + 1);
  if (again == NULL) abort();
  for (i = 0; i < r.nenv; i++) {
    size_t n = strlen(r.env[i]);
    if (n == 0 || strchr(r.env[i], '=') == NULL) abort();
    if (r.env[i] < buf || r.env[i] + n >= buf + size) abort();
    memcpy(again + pos, r.env[i], n + 1);
    pos += n + 1;
  }
  again[pos++] = '\0';
  for (i = 0; i < r.nargv; i++) {
    size_t n = strlen(r.argv[i]);
    if (r.argv[i] < buf || r.argv[i] + n >= buf + size) abort();
    memcpy(again + pos, r.argv[i], n + 1);
    pos += n + 1;
  }
  if (pos != size || memcmp(again, data, size) != 0) abort();
  free(again);
  free(r.env);
  free(buf);
  return 0;
}
