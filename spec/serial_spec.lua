-- The serialiser of the process pool: prefork.encode and prefork.decode.
-- Every value comes back exactly; bad input raises a clear error.

local lu = require "luaunit"
local prefork = require "prefork"

local function roundtrip (...)
  return prefork.decode(prefork.encode(...))
end

TestSerial = {}

function TestSerial:test_scalars_exactly ()
  local vals = {true, false, 0, 1, -1, math.maxinteger, math.mininteger,
                0.5, -2.25, 1e308, 5e-324, math.pi, 1/0, -1/0, "", "x",
                "with\0zero", ("\255"):rep(1000)}
  for _, v in ipairs(vals) do
    local got = roundtrip(v)
    lu.assertEquals(math.type(got), math.type(v))
    lu.assertEquals(got, v)
  end
  local nan = roundtrip(0/0)
  lu.assertTrue(nan ~= nan)
  lu.assertEquals(1 / roundtrip(-0.0), -1/0)  -- the sign of zero is kept
  lu.assertEquals(math.type(roundtrip(3.0)), "float")  -- not an integer
end

function TestSerial:test_integers_small_ones_short ()
  for _, v in ipairs{0, 1, -1, 63, -64, 64, 1 << 20, (1 << 55) - 1, -(1 << 55),
                     1 << 55, -(1 << 55) - 1, math.maxinteger, math.mininteger} do
    local got = roundtrip(v)
    lu.assertEquals(got, v)
    lu.assertEquals(math.type(got), "integer")
  end
  lu.assertEquals(#prefork.encode(5), 4)  -- magic, count, tag, one byte
  lu.assertEquals(#prefork.encode(1 << 60), 11)  -- the 8-byte form
end

function TestSerial:test_a_list_range_in_one_call ()
  local core = require "prefork.core"
  local t = {1, nil, "x", {2}, 4.5}
  local s = core.encodelist(t, 1, 5)
  lu.assertEquals(s, prefork.encode(1, nil, "x", {2}, 4.5))
  lu.assertEquals(core.encodelist(t, 3, 2), prefork.encode())
  local into = {"keep"}
  lu.assertEquals(core.decodeinto(s, into, 1), 5)
  lu.assertEquals(into, {"keep", 1, nil, "x", {2}, 4.5})
  local n, fresh = core.decodeinto(s, nil, 0)
  lu.assertEquals(n, 5)
  lu.assertEquals(fresh[4], {2})
  lu.assertErrorMsgContains("corrupt message", core.decodeinto, s:sub(1, -2), {}, 0)
  lu.assertErrorMsgContains("cannot send a function", core.encodelist, {print}, 1, 1)
  lu.assertErrorMsgContains("a range of the list", core.encodelist, t, 0, 1)
end

function TestSerial:test_any_number_of_values_nils_included ()
  lu.assertEquals(select("#", roundtrip()), 0)
  lu.assertEquals({roundtrip(nil, 1, nil)}, {nil, 1, nil})
  lu.assertEquals(select("#", roundtrip(nil, 1, nil)), 3)
end

function TestSerial:test_nested_tables_shared_references_and_cycles ()
  local shared = {"s"}
  local t = {1, 2, {3, {4}}, name = "n", [1.5] = "float key", [false] = 0,
             a = shared, b = shared}
  t.self = t
  t.deep = {back = t}
  local u = roundtrip(t)
  lu.assertEquals(u[3][2][1], 4)
  lu.assertEquals(u.name, "n")
  lu.assertEquals(u[1.5], "float key")
  lu.assertEquals(u[false], 0)
  lu.assertIs(u.a, u.b)  -- one table, as sent
  lu.assertIs(u.self, u)
  lu.assertIs(u.deep.back, u)
  local k = {}  -- a table as a key, and sent again: the same table
  local m, kk = roundtrip({[k] = "table key"}, k)
  lu.assertEquals(m[kk], "table key")
end

function TestSerial:test_a_table_shared_between_values ()
  local s = {}
  local a, b = roundtrip(s, s)
  lu.assertIs(a, b)
end

function TestSerial:test_functions_userdata_threads_are_refused ()
  lu.assertErrorMsgContains("cannot send a function", prefork.encode, print)
  lu.assertErrorMsgContains("cannot send a thread", prefork.encode,
                            coroutine.create(print))
  lu.assertErrorMsgContains("cannot send a userdata", prefork.encode,
                            {io.stdout})
  lu.assertErrorMsgContains("cannot send a function", prefork.encode,
                            {deep = {deeper = {f = print}}})
end

function TestSerial:test_corrupt_input_raises_and_never_crashes ()
  local s = prefork.encode({1, "two", {3}}, 4.5, "six")
  for i = 0, #s - 1 do  -- every cut
    lu.assertErrorMsgContains("corrupt message", prefork.decode, s:sub(1, i))
  end
  lu.assertErrorMsgContains("bytes after the last value", prefork.decode, s .. "x")
  lu.assertErrorMsgContains("not an encoded message", prefork.decode, "garbage")
  lu.assertErrorMsgContains("a reference to no table", prefork.decode, "P\1\7\9")
  lu.assertErrorMsgContains("an unknown tag", prefork.decode, "P\1\99")
  lu.assertErrorMsgContains("a nil or NaN key", prefork.decode, "P\1\6\0\2\8")
  lu.assertErrorMsgContains("a string cut short", prefork.decode,
                            "P\1\5\255\255\255\255\15")
  lu.assertErrorMsgContains("more values than bytes", prefork.decode,
                            "P\255\255\255\255\15")
  lu.assertErrorMsgContains("string expected", prefork.decode, {})
  math.randomseed(7)
  for _ = 1, 2000 do  -- random bytes after a valid head
    local junk = {}
    for j = 1, math.random(1, 40) do junk[j] = string.char(math.random(0, 255)) end
    local ok, err = pcall(prefork.decode, "P" .. table.concat(junk))
    lu.assertTrue(ok or (err:find("corrupt message") or err:find("too many values")) ~= nil, err)
  end
end

function TestSerial:test_nesting_is_bounded ()
  local t = {}
  local cur = t
  for _ = 1, 300 do cur.next = {} cur = cur.next end
  lu.assertErrorMsgContains("nested deeper than", prefork.encode, t)
  local deep = "P\1" .. ("\6\5\1x"):rep(300)
  lu.assertErrorMsgContains("tables nested too deep", prefork.decode, deep)
end

function TestSerial:test_large_values ()
  local big = {}
  for i = 1, 100000 do big[i] = i % 7 == 0 and ("s" .. i) or i end
  local back = roundtrip(big)
  lu.assertEquals(#back, 100000)
  lu.assertEquals(back[70], "s70")
  lu.assertEquals(back[99999], 99999)
end

os.exit(lu.LuaUnit.run())
