/*
** serial.c: the serialiser of Lua values (for the process pool's calls
** and answers). prefork.encode(...) -> string; prefork.decode(s) -> ...
**
** Format: a magic byte, the number of values, then each value as a tag
** byte and its payload:
**   NIL, FALSE, TRUE
**   INT    8 bytes, little-endian two's complement (every integer exactly)
**   FLT    8 bytes, the IEEE double's bits (NaN, infinities, -0.0 kept)
**   STR    a length (varint), the bytes
**   TAB    the table's key/value pairs, each a value, then END; a table
**          is numbered by the order it first appears in
**   REF    a varint: a table seen before (shared references, cycles)
** Functions, userdata and threads cannot be sent and raise. decode raises
** "corrupt message: ..." on anything malformed; it never reads past the
** string, and nesting deeper than PF_MAXDEPTH is refused.
*/

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "prefork.h"


#if !defined(PF_MAXDEPTH)
#define PF_MAXDEPTH	200  /* tables within tables, at most */
#endif

#define MAGIC	0x50  /* 'P' */

enum { T_NIL, T_FALSE, T_TRUE, T_INT, T_FLT, T_STR, T_TAB, T_REF, T_END };


/* {======================================================
** Encoding
** ======================================================= */

/* the output: a growable buffer in a userdata, freed by its __gc even
** when an error interrupts the encoding */
typedef struct obuf {
  char *p;
  size_t n, cap;
} obuf;

#define OBUF	"prefork.obuf"


static int obuf_gc (lua_State *L) {
  obuf *b = (obuf *)luaL_checkudata(L, 1, OBUF);
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
  return 0;
}


static void put (lua_State *L, obuf *b, const void *s, size_t n) {
  if (b->cap - b->n < n) {
    size_t cap = b->cap ? b->cap : 256;
    char *np;
    while (cap - b->n < n) {
      if (cap > ((size_t)-1) / 2) luaL_error(L, "encode: message too large");
      cap *= 2;
    }
    np = (char *)realloc(b->p, cap);
    if (np == NULL) luaL_error(L, "encode: not enough memory");
    b->p = np;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
}


static void putbyte (lua_State *L, obuf *b, int c) {
  unsigned char u = (unsigned char)c;
  put(L, b, &u, 1);
}


static void putvarint (lua_State *L, obuf *b, size_t v) {
  unsigned char tmp[10];
  int n = 0;
  do {
    tmp[n++] = (unsigned char)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    v >>= 7;
  } while (v > 0);
  put(L, b, tmp, (size_t)n);
}


static void put64 (lua_State *L, obuf *b, unsigned long long v) {
  unsigned char tmp[8];
  int i;
  for (i = 0; i < 8; i++) tmp[i] = (unsigned char)(v >> (8 * i));
  put(L, b, tmp, 8);
}


/* encode the value at idx; seen (at index seen) maps tables to numbers */
static void encode (lua_State *L, obuf *b, int idx, int seen, int depth) {
  switch (lua_type(L, idx)) {
    case LUA_TNIL: putbyte(L, b, T_NIL); break;
    case LUA_TBOOLEAN:
      putbyte(L, b, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        putbyte(L, b, T_INT);
        put64(L, b, (unsigned long long)lua_tointeger(L, idx));
      }
      else {
        double d = (double)lua_tonumber(L, idx);
        unsigned long long u;
        memcpy(&u, &d, 8);
        putbyte(L, b, T_FLT);
        put64(L, b, u);
      }
      break;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      putbyte(L, b, T_STR);
      putvarint(L, b, n);
      put(L, b, s, n);
      break;
    }
    case LUA_TTABLE: {
      lua_Integer id;
      lua_pushvalue(L, idx);
      if (lua_rawget(L, seen) != LUA_TNIL) {
        putbyte(L, b, T_REF);  /* seen before: a reference */
        putvarint(L, b, (size_t)lua_tointeger(L, -1));
        lua_pop(L, 1);
        break;
      }
      lua_pop(L, 1);
      if (depth >= PF_MAXDEPTH)
        luaL_error(L, "encode: tables nested deeper than %d", PF_MAXDEPTH);
      luaL_checkstack(L, 6, "encode: nesting too deep");
      id = (lua_Integer)luaL_len(L, seen) + 1;
      lua_pushvalue(L, idx);
      lua_pushinteger(L, id);
      lua_rawset(L, seen);  /* table -> its number */
      lua_pushvalue(L, idx);
      lua_rawseti(L, seen, id);  /* and the count grows */
      putbyte(L, b, T_TAB);
      lua_pushnil(L);
      while (lua_next(L, idx) != 0) {
        int top = lua_gettop(L);
        encode(L, b, top - 1, seen, depth + 1);
        encode(L, b, top, seen, depth + 1);
        lua_pop(L, 1);
      }
      putbyte(L, b, T_END);
      break;
    }
    default:
      luaL_error(L, "encode: cannot send a %s", luaL_typename(L, idx));
  }
}


/* the fast way for values that cannot fail (no table, no function...):
** a luaL_Buffer, with no userdata and no table of seen tables */
static int encodeflat (lua_State *L, int n) {
  luaL_Buffer b;
  int i;
  unsigned char v[10];
  size_t k = 0, u = (size_t)n;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, MAGIC);
  do {  /* the count, as putvarint writes it */
    v[k++] = (unsigned char)((u & 0x7f) | (u > 0x7f ? 0x80 : 0));
    u >>= 7;
  } while (u > 0);
  luaL_addlstring(&b, (const char *)v, k);
  for (i = 1; i <= n; i++) {
    switch (lua_type(L, i)) {
      case LUA_TNIL: luaL_addchar(&b, T_NIL); break;
      case LUA_TBOOLEAN:
        luaL_addchar(&b, lua_toboolean(L, i) ? T_TRUE : T_FALSE);
        break;
      case LUA_TNUMBER: {
        unsigned long long x;
        int j;
        if (lua_isinteger(L, i)) {
          luaL_addchar(&b, T_INT);
          x = (unsigned long long)lua_tointeger(L, i);
        }
        else {
          double d = (double)lua_tonumber(L, i);
          memcpy(&x, &d, 8);
          luaL_addchar(&b, T_FLT);
        }
        for (j = 0; j < 8; j++) v[j] = (unsigned char)(x >> (8 * j));
        luaL_addlstring(&b, (const char *)v, 8);
        break;
      }
      default: {  /* a string */
        size_t len;
        const char *str = lua_tolstring(L, i, &len);
        luaL_addchar(&b, T_STR);
        k = 0; u = len;
        do {
          v[k++] = (unsigned char)((u & 0x7f) | (u > 0x7f ? 0x80 : 0));
          u >>= 7;
        } while (u > 0);
        luaL_addlstring(&b, (const char *)v, k);
        luaL_addlstring(&b, str, len);
        break;
      }
    }
  }
  luaL_pushresult(&b);
  return 1;
}


/* prefork.encode(...) -> string */
static int l_encode (lua_State *L) {
  int n = lua_gettop(L), i, seen;
  obuf *b;
  for (i = 1; i <= n; i++) {
    int t = lua_type(L, i);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER
        && t != LUA_TSTRING) break;
  }
  if (i > n) return encodeflat(L, n);
  b = (obuf *)lua_newuserdatauv(L, sizeof(obuf), 0);
  memset(b, 0, sizeof(*b));
  luaL_setmetatable(L, OBUF);
  lua_newtable(L);  /* seen: table -> number, and number -> table */
  seen = lua_gettop(L);
  putbyte(L, b, MAGIC);
  putvarint(L, b, (size_t)n);
  for (i = 1; i <= n; i++)
    encode(L, b, i, seen, 0);
  lua_pushlstring(L, b->p, b->n);
  return 1;
}


/* core.encodeargs(...): encode, without a function that comes last (a
** pool call's callback) */
static int l_encodeargs (lua_State *L) {
  int n = lua_gettop(L);
  if (n > 0 && lua_type(L, n) == LUA_TFUNCTION) lua_settop(L, n - 1);
  return l_encode(L);
}

/* }====================================================== */


/* {======================================================
** Decoding
** ======================================================= */

typedef struct ibuf {
  const unsigned char *p, *end;
  int tables;  /* index of the table of decoded tables, by number */
} ibuf;


static int corrupt (lua_State *L, const char *why) {
  return luaL_error(L, "corrupt message: %s", why);
}


static int getbyte (lua_State *L, ibuf *in) {
  if (in->p >= in->end) corrupt(L, "cut short");
  return *in->p++;
}


static size_t getvarint (lua_State *L, ibuf *in) {
  size_t v = 0;
  int shift = 0, c;
  do {
    if (shift > 63) corrupt(L, "a length that does not end");
    c = getbyte(L, in);
    v |= (size_t)(c & 0x7f) << shift;
    shift += 7;
  } while (c & 0x80);
  return v;
}


static unsigned long long get64 (lua_State *L, ibuf *in) {
  unsigned long long v = 0;
  int i;
  if (in->end - in->p < 8) corrupt(L, "cut short");
  for (i = 0; i < 8; i++) v |= (unsigned long long)in->p[i] << (8 * i);
  in->p += 8;
  return v;
}


/* push the next value; 0 when the tag was END (nothing pushed) */
static int decode (lua_State *L, ibuf *in, int depth) {
  int tag = getbyte(L, in);
  luaL_checkstack(L, 4, "decode: nesting too deep");
  switch (tag) {
    case T_NIL: lua_pushnil(L); return 1;
    case T_FALSE: lua_pushboolean(L, 0); return 1;
    case T_TRUE: lua_pushboolean(L, 1); return 1;
    case T_INT:
      lua_pushinteger(L, (lua_Integer)get64(L, in));
      return 1;
    case T_FLT: {
      unsigned long long u = get64(L, in);
      double d;
      memcpy(&d, &u, 8);
      lua_pushnumber(L, (lua_Number)d);
      return 1;
    }
    case T_STR: {
      size_t n = getvarint(L, in);
      if ((size_t)(in->end - in->p) < n) corrupt(L, "a string cut short");
      lua_pushlstring(L, (const char *)in->p, n);
      in->p += n;
      return 1;
    }
    case T_REF: {
      size_t id = getvarint(L, in);
      if (id == 0 || id > (size_t)luaL_len(L, in->tables))
        corrupt(L, "a reference to no table");
      lua_rawgeti(L, in->tables, (lua_Integer)id);
      return 1;
    }
    case T_TAB: {
      int t;
      if (depth >= PF_MAXDEPTH) corrupt(L, "tables nested too deep");
      lua_newtable(L);
      t = lua_gettop(L);
      lua_pushvalue(L, t);
      lua_rawseti(L, in->tables, luaL_len(L, in->tables) + 1);
      while (decode(L, in, depth + 1)) {  /* a key */
        if (lua_isnil(L, -1)
            || (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1)
                != lua_tonumber(L, -1)))
          corrupt(L, "a nil or NaN key");
        if (!decode(L, in, depth + 1)) corrupt(L, "a key without a value");
        lua_rawset(L, t);
      }
      return 1;
    }
    case T_END:
      if (depth == 0) corrupt(L, "an end outside a table");
      return 0;
    default:
      return corrupt(L, "an unknown tag");
  }
}


/* prefork.decode(s) -> the values prefork.encode was given */
static int l_decode (lua_State *L) {
  size_t len, n, i;
  const char *s = luaL_checklstring(L, 1, &len);
  ibuf in;
  in.p = (const unsigned char *)s;
  in.end = in.p + len;
  lua_settop(L, 1);
  lua_newtable(L);
  in.tables = 2;
  if (getbyte(L, &in) != MAGIC) corrupt(L, "not an encoded message");
  n = getvarint(L, &in);
  if (n > len) corrupt(L, "more values than bytes");
  luaL_checkstack(L, (int)(n < 1000000 ? n : 1000000) + 8, "decode: too many values");
  for (i = 0; i < n; i++)
    if (!decode(L, &in, 0)) corrupt(L, "an end outside a table");
  if (in.p != in.end) corrupt(L, "bytes after the last value");
  return (int)n;
}

/* }====================================================== */


void pf_open_serial (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"encode", l_encode},
    {"encodeargs", l_encodeargs},
    {"decode", l_decode},
    {NULL, NULL}
  };
  luaL_newmetatable(L, OBUF);
  lua_pushcfunction(L, obuf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
