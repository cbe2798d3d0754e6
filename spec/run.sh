#!/bin/sh
# Run every spec file in its own process under a time limit, and end with
# one line: "N passed, N skipped, N failed". A skipped test says why (the
# reasons are listed at the end) and is not counted as passed. Per-file
# output is kept in spec/out/.
#   SPEC_FILES   the files to run (default: spec/*_spec.lua)
#   SPEC_TIMEOUT seconds each file may take (default 180)
#   SPEC_LUA     the command that runs Lua (default: $LUA or lua5.4)
cd "$(dirname "$0")/.." || exit 2
lua=${SPEC_LUA:-${LUA:-lua5.4}}
limit=${SPEC_TIMEOUT:-180}
out=spec/out
mkdir -p "$out"
pass=0
skip=0
fail=0
: >"$out/skipped"
for f in ${SPEC_FILES:-spec/*_spec.lua}; do
  name=$(basename "$f" .lua)
  start=$(date +%s)
  timeout -k 10 "$limit" $lua "$f" -o tap >"$out/$name.tap" 2>"$out/$name.err" </dev/null
  rc=$?
  s=$(grep -c '^ok .*# SKIP' "$out/$name.tap")
  p=$(($(grep -c '^ok ' "$out/$name.tap") - s))
  n=$(grep -c '^not ok ' "$out/$name.tap")
  note=""
  if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then  # died, hung or leaked
    n=1
    [ "$rc" -eq 124 ] && note=" (timed out after ${limit}s)" || note=" (exit $rc)"
  fi
  pass=$((pass + p))
  skip=$((skip + s))
  fail=$((fail + n))
  printf '%-28s %3d passed, %d skipped, %d failed%s  [%ss]\n' "$name" "$p" "$s" \
    "$n" "$note" "$(($(date +%s) - start))"
  grep '^ok .*# SKIP' "$out/$name.tap" | sed "s/^ok *[0-9]*[[:space:]]*# SKIP/$name:/" \
    >>"$out/skipped"
  if [ "$n" -ne 0 ]; then
    grep -A12 '^not ok ' "$out/$name.tap" | sed 's/^/    /'
    tail -n 20 "$out/$name.err" | sed 's/^/    err: /'
  fi
done
if [ -s "$out/skipped" ]; then
  echo "skipped:"
  sed 's/^/  /' "$out/skipped"
fi
echo "$pass passed, $skip skipped, $fail failed"
[ "$fail" -eq 0 ]
