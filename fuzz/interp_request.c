/*
** fuzz/interp_request.c: libFuzzer target for the prefork-interp request
** parser (pf_req_parse, src/wire.c), called directly. Whatever the
** input, the parser must not crash; when it accepts, the strings it
** returns must rebuild the input exactly (environment, the empty string,
** argv), every environment entry must hold '=' and argv must not be
** empty. Also the greeting: always "PFI\n" and a zero length.
*/

#include <stdlib.h>
#include <string.h>

#include "../src/wire.h"

int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size);


/* the strings of v, each with its NUL, at again + *pos; each must lie in
** buf (size bytes) and, in the environment, hold '=' */
static void rebuild (char **v, int n, int env, const char *buf, size_t size,
                     char *again, size_t *pos) {
  int i;
  for (i = 0; i < n; i++) {
    size_t len = strlen(v[i]);
    if (env && (len == 0 || strchr(v[i], '=') == NULL)) abort();
    if (v[i] < buf || v[i] + len >= buf + size) abort();
    memcpy(again + *pos, v[i], len + 1);
    *pos += len + 1;
  }
}


int LLVMFuzzerTestOneInput (const unsigned char *data, size_t size) {
  pf_req r;
  unsigned char g[PF_GREETLEN];
  char *buf, *again;
  size_t pos = 0;
  if (pf_greet_encode(g) != 8 || memcmp(g, "PFI\n\0\0\0\0", 8) != 0)
    abort();
  buf = (char *)malloc(size + 1);
  if (buf == NULL) return 0;
  memcpy(buf, data, size);
  if (pf_req_parse(buf, size, &r) != NULL) {
    if (r.env != NULL || r.nenv != 0 || r.nargv != 0) abort();
    free(buf);
    return 0;
  }
  if (r.nargv < 1 || r.env[r.nenv] != NULL || r.argv[r.nargv] != NULL) abort();
  if ((again = (char *)malloc(size + 1)) == NULL) abort();
  rebuild(r.env, r.nenv, 1, buf, size, again, &pos);
  again[pos++] = '\0';
  rebuild(r.argv, r.nargv, 0, buf, size, again, &pos);
  if (pos != size || memcmp(again, data, size) != 0) abort();
  free(again);
  free(r.env);
  free(buf);
  return 0;
}
