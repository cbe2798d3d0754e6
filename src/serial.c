/*
** serial.c: the serialiser of Lua values (for the process pool's calls
** and answers). prefork.encode(...) -> string; prefork.decode(s) -> ...
**
** Format: a magic byte, the number of values, then each value as a tag
** byte and its payload:
**   NIL, FALSE, TRUE
**   INT    8 bytes, little-endian two's complement (every integer exactly)
**   SINT   a varint of the zigzag form of an integer of at most 56 bits
**          (0, -1, 1, -2... as 0, 1, 2, 3...): most integers in 1 to 4
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

enum { T_NIL, T_FALSE, T_TRUE, T_INT, T_FLT, T_STR, T_TAB, T_REF, T_END,
       T_SINT };


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


/* room for n more bytes at the end of b */
static unsigned char *reserve (lua_State *L, obuf *b, size_t n) {
  if (b->cap - b->n < n) {
    size_t cap = b->cap ? b->cap : 256;
    char *np;
    while (cap - b->n < n) {
      if (cap > ((size_t)-1) / 2) luaL_error(L, "encode: message too large");
      cap *= 2;
    }
    np = (char *)realloc(b->p, cap);
    if (np == NULL) luaL_error(L, "not enough memory");
    b->p = np;
    b->cap = cap;
  }
  return (unsigned char *)b->p + b->n;
}


static void put (lua_State *L, obuf *b, const void *s, size_t n) {
  memcpy(reserve(L, b, n), s, n);
  b->n += n;
}


/* the varint v into tmp; its length */
static size_t varint (unsigned char *tmp, size_t v) {
  size_t k = 0;
  do {
    tmp[k++] = (unsigned char)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    v >>= 7;
  } while (v > 0);
  return k;
}


/* a new output buffer on top of the stack, with the head of a message
** of n values */
static obuf *newobuf (lua_State *L, size_t n) {
  unsigned char h[11];
  obuf *b = (obuf *)lua_newuserdatauv(L, sizeof(obuf), 0);
  memset(b, 0, sizeof(*b));
  luaL_setmetatable(L, OBUF);
  h[0] = MAGIC;
  put(L, b, h, 1 + varint(h + 1, n));
  return b;
}


/*
** The encoding of the value at idx when it is flat (nil, a boolean, a
** number, a string): its head (the tag, the number or the string's
** length) into h, with its length returned, and a string's bytes in *s,
** *n. 0 for a value that is not flat.
*/
static size_t flathead (lua_State *L, int idx, unsigned char *h,
                        const char **s, size_t *n) {
  unsigned long long x;
  int i;
  *n = 0;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: h[0] = T_NIL; return 1;
    case LUA_TBOOLEAN: h[0] = lua_toboolean(L, idx) ? T_TRUE : T_FALSE; return 1;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        lua_Integer v = lua_tointeger(L, idx);
        x = ((unsigned long long)v << 1) ^ (v < 0 ? ~0ull : 0);  /* zigzag */
        if (x < (1ull << 56)) {
          h[0] = T_SINT;
          return 1 + varint(h + 1, (size_t)x);
        }
        h[0] = T_INT;
        x = (unsigned long long)v;
      }
      else {
        double d = (double)lua_tonumber(L, idx);
        memcpy(&x, &d, 8);
        h[0] = T_FLT;
      }
      for (i = 0; i < 8; i++) h[1 + i] = (unsigned char)(x >> (8 * i));
      return 9;
    case LUA_TSTRING:
      *s = lua_tolstring(L, idx, n);
      h[0] = T_STR;
      return 1 + varint(h + 1, *n);
    default: return 0;
  }
}


static void encodetable (lua_State *L, obuf *b, int idx, int seen, int depth);

/* encode the value at idx; seen (at index seen) maps tables to numbers */
static void encode (lua_State *L, obuf *b, int idx, int seen, int depth) {
  const char *s;
  size_t n, k = flathead(L, idx, reserve(L, b, 11), &s, &n);
  if (k > 0) {
    b->n += k;
    if (n > 0) put(L, b, s, n);
  }
  else if (lua_type(L, idx) == LUA_TTABLE)
    encodetable(L, b, idx, seen, depth);
  else
    luaL_error(L, "encode: cannot send a %s", luaL_typename(L, idx));
}


/* encode the table at idx: a reference when seen before */
static void encodetable (lua_State *L, obuf *b, int idx, int seen, int depth) {
  unsigned char h[11];
  lua_Integer id;
  lua_pushvalue(L, idx);
  if (lua_rawget(L, seen) != LUA_TNIL) {  /* seen before: a reference */
    h[0] = T_REF;
    put(L, b, h, 1 + varint(h + 1, (size_t)lua_tointeger(L, -1)));
    lua_pop(L, 1);
    return;
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
  h[0] = T_TAB;
  put(L, b, h, 1);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int top = lua_gettop(L);
    encode(L, b, top - 1, seen, depth + 1);
    encode(L, b, top, seen, depth + 1);
    lua_pop(L, 1);
  }
  h[0] = T_END;
  put(L, b, h, 1);
}


/* the n values from stack index base on, encoded, pushed; the fast way
** for flat values (a luaL_Buffer: no userdata, no table of seen tables),
** else an obuf */
static int encodevalues (lua_State *L, int base, int n) {
  unsigned char h[11];
  const char *s;
  size_t len;
  luaL_Buffer b;
  int i, seen;
  obuf *ob;
  for (i = base; i < base + n; i++)
    if (lua_type(L, i) > LUA_TSTRING || lua_type(L, i) == LUA_TLIGHTUSERDATA)
      break;
  if (i == base + n) {
    luaL_buffinit(L, &b);
    h[0] = MAGIC;
    luaL_addlstring(&b, (const char *)h, 1 + varint(h + 1, (size_t)n));
    for (i = base; i < base + n; i++) {
      luaL_addlstring(&b, (const char *)h, flathead(L, i, h, &s, &len));
      if (len > 0) luaL_addlstring(&b, s, len);
    }
    luaL_pushresult(&b);
    return 1;
  }
  ob = newobuf(L, (size_t)n);
  lua_newtable(L);  /* seen: table -> number, and number -> table */
  seen = lua_gettop(L);
  for (i = base; i < base + n; i++)
    encode(L, ob, i, seen, 0);
  lua_pushlstring(L, ob->p, ob->n);
  return 1;
}


/* prefork.encode(...) -> string */
static int l_encode (lua_State *L) {
  return encodevalues(L, 1, lua_gettop(L));
}


/* core.encodeargs(...): encode, without a function that comes last (a
** pool call's callback) */
static int l_encodeargs (lua_State *L) {
  int n = lua_gettop(L);
  if (n > 0 && lua_type(L, n) == LUA_TFUNCTION) n--;
  return encodevalues(L, 1, n);
}


/*
** core.encodelist(t, i, j [, max]) -> string, k: encode(t[i], ..., t[k])
** in one call (a chunk of a pool's map), where k is j, or the first index
** whose value brings the string to max bytes or more (at least one value).
** The head goes in last, right-aligned in the room kept for it.
*/
static int l_encodelist (lua_State *L) {
  lua_Integer i = luaL_checkinteger(L, 2), j = luaL_checkinteger(L, 3), k;
  size_t max = (size_t)luaL_optinteger(L, 4, LUA_MAXINTEGER), hn;
  unsigned char h[11];
  obuf *b;
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_argcheck(L, i >= 1 && j >= i - 1 && j - i < (1 << 30), 3,
                "a range of the list expected");
  lua_settop(L, 4);
  b = newobuf(L, 0);
  b->n = sizeof(h);  /* room for the head */
  lua_newtable(L);  /* seen */
  for (k = i; k <= j && (k == i || b->n - sizeof(h) < max); k++) {
    lua_geti(L, 1, k);
    encode(L, b, 7, 6, 0);
    lua_pop(L, 1);
  }
  h[0] = MAGIC;
  hn = 1 + varint(h + 1, (size_t)(k - i));
  memcpy(b->p + sizeof(h) - hn, h, hn);
  lua_pushlstring(L, b->p + sizeof(h) - hn, b->n - sizeof(h) + hn);
  lua_pushinteger(L, k - 1);
  return 2;
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
  switch (tag) {
    case T_NIL: lua_pushnil(L); return 1;
    case T_FALSE: lua_pushboolean(L, 0); return 1;
    case T_TRUE: lua_pushboolean(L, 1); return 1;
    case T_INT:
      lua_pushinteger(L, (lua_Integer)get64(L, in));
      return 1;
    case T_SINT: {
      unsigned long long x = getvarint(L, in);
      lua_pushinteger(L, (lua_Integer)((x >> 1) ^ (0ull - (x & 1))));
      return 1;
    }
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
      luaL_checkstack(L, 4, "decode: nesting too deep");
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


/* the head of the message s: the count of its values, the reader at the
** first one; the table of decoded tables pushed */
static size_t decodehead (lua_State *L, ibuf *in, const char *s, size_t len) {
  size_t n;
  in->p = (const unsigned char *)s;
  in->end = in->p + len;
  lua_newtable(L);
  in->tables = lua_gettop(L);
  if (getbyte(L, in) != MAGIC) corrupt(L, "not an encoded message");
  n = getvarint(L, in);
  if (n > len) corrupt(L, "more values than bytes");
  return n;
}


/* the values of the message s[0, len) pushed (over a table of decoded
** tables); their count. Raises "corrupt message: ..." */
int pf_decode (lua_State *L, const char *s, size_t len) {
  size_t n, i;
  ibuf in;
  n = decodehead(L, &in, s, len);
  luaL_checkstack(L, (int)(n < 1000000 ? n : 1000000) + 8, "decode: too many values");
  for (i = 0; i < n; i++)
    if (!decode(L, &in, 0)) corrupt(L, "an end outside a table");
  if (in.p != in.end) corrupt(L, "bytes after the last value");
  return (int)n;
}


/* prefork.decode(s) -> the values prefork.encode was given */
static int l_decode (lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  return pf_decode(L, s, len);
}


/* core.decodeinto(s, t, offset) -> n, t: the n values of s decoded into
** t[offset + 1 .. offset + n] (raw), in one call (a chunk of a pool's
** map); t nil: into a new list */
static int l_decodeinto (lua_State *L) {
  size_t len, n, i;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Integer off = luaL_checkinteger(L, 3);
  ibuf in;
  if (lua_isnil(L, 2)) lua_pushnil(L);  /* made below, once n is known */
  else luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 3);
  n = decodehead(L, &in, s, len);
  if (lua_isnil(L, 2)) {
    lua_createtable(L, n < (1u << 24) ? (int)n : 0, 0);
    lua_replace(L, 2);
  }
  for (i = 0; i < n; i++) {
    if (!decode(L, &in, 0)) corrupt(L, "an end outside a table");
    lua_rawseti(L, 2, off + (lua_Integer)i + 1);
  }
  if (in.p != in.end) corrupt(L, "bytes after the last value");
  lua_pushinteger(L, (lua_Integer)n);
  lua_pushvalue(L, 2);
  return 2;
}


/* core.newlist(n) -> a table with room for n items in its list part */
static int l_newlist (lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  lua_createtable(L, n > 0 && n < (1 << 24) ? (int)n : 0, 0);
  return 1;
}

/* }====================================================== */


void pf_open_serial (lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"encode", l_encode},
    {"encodeargs", l_encodeargs},
    {"encodelist", l_encodelist},
    {"decode", l_decode},
    {"decodeinto", l_decodeinto},
    {"newlist", l_newlist},
    {NULL, NULL}
  };
  luaL_newmetatable(L, OBUF);
  lua_pushcfunction(L, obuf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
}
