/*
** wire.h: byte-level encodings shared by prefork.core and the lua-prefork
** command. Plain C99: no Lua, no libev, so that the static client
** compiles it too.
*/

#if !defined(wire_h)
#define wire_h

#include <stdint.h>


/* a big-endian u32: the length and status fields of every wire here */
static inline void pf_put32 (unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}


static inline uint32_t pf_get32 (const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8
         | (uint32_t)p[3];
}

#endif
