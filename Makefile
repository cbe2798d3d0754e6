# lua-prefork: a Lua 5.4 module in C on libev for preforking servers.
# `make` builds; `make test` installs what is missing, builds and runs
# the suite; `make run` serves examples/http.lua on 127.0.0.1:8080.

LUA_VERSION = 5.4
LUA = lua$(LUA_VERSION)
LUA_INCDIR = /usr/include/lua$(LUA_VERSION)
# where `make install` puts things (luarocks passes its own)
PREFIX = /usr/local
LIBDIR = $(PREFIX)/lib/lua/$(LUA_VERSION)
LUADIR = $(PREFIX)/share/lua/$(LUA_VERSION)
BINDIR = $(PREFIX)/bin

CC = cc
CFLAGS = -O2 -g
LIBFLAG = -shared
EV_CFLAGS =
EV_LDFLAGS =
EV_LIBS = -lev
WARN = -Wall -Wextra -Wpedantic -Werror -Wcast-qual -Wshadow \
       -Wwrite-strings -Wmissing-prototypes -Wstrict-prototypes \
       -Wdeclaration-after-statement -Wc++-compat -Wundef \
       -Wpointer-arith -Wmissing-declarations -Wredundant-decls \
       -Wnested-externs
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE -fPIC -fvisibility=hidden $(WARN) \
             -I$(LUA_INCDIR) $(EV_CFLAGS) $(CFLAGS)

BUILD = build
SRCS = src/core.c src/loop.c src/proc.c src/serial.c src/score.c \
       src/task.c src/conn.c src/listen.c src/connect.c src/inherit.c \
       src/fdpass.c \
       src/accept.c src/worker.c src/serve.c src/table.c src/supervise.c \
       src/status.c src/signals.c src/upgrade.c src/spawn.c src/machine.c \
       src/master.c src/notify.c src/pool.c src/wire.c src/interp.c \
       src/interp_server.c src/interp_spare.c src/interp_log.c \
       src/interp_call.c src/interp_exec.c
OBJS = $(SRCS:src/%.c=$(BUILD)/obj/%.o)
CORE = $(BUILD)/prefork/core.so
LUASRC = src/prefork/init.lua src/prefork/pool.lua src/prefork/interp.lua \
         src/prefork/status.lua src/prefork/listeners.lua src/prefork/deploy.lua \
         src/prefork/socket.lua
# the client command: plain C, linked statically (start-up time: no
# dynamic loader, no NSS); CLIENT_STATIC= links it dynamically, but for
# nettle (the sanitizer builds do)
CLIENT = $(BUILD)/lua-prefork
CLIENT_SRCS = lua-prefork/main.c lua-prefork/msg.c lua-prefork/args.c \
              lua-prefork/rundir.c lua-prefork/call.c lua-prefork/spawn.c \
              src/wire.c
CLIENT_CFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) -DLUA_PREFORK_LUA='"$(LUA)"' \
                $(CFLAGS)
CLIENT_STATIC = -static
NETTLE_STATIC = -Wl,-Bstatic -lnettle -Wl,-Bdynamic
NETTLE_LIBS = $(if $(CLIENT_STATIC),-lnettle,$(NETTLE_STATIC))

# the suite runs from the checkout
TEST_ENV = LUA_PATH="$(CURDIR)/src/?.lua;$(CURDIR)/src/?/init.lua;$(CURDIR)/spec/?.lua;;" \
           LUA_CPATH="$(CURDIR)/$(BUILD)/?.so;;" LUA="$(LUA)" SPEC_FILES="$(SPEC_FILES)" \
           LUA_PREFORK_CLIENT="$(CURDIR)/$(CLIENT)"
SPEC_TIMEOUT = 180

# Debian packages: to build and run, to test, to check, to measure
DEPS_RUN = lua5.4 liblua5.4-dev libev-dev gcc make nettle-dev
DEPS_TEST = $(DEPS_RUN) lua-unit lua-socket lua-busted luarocks curl wrk \
            iproute2 procps chiark-utils-bin chiark-scripts libio-fdpass-perl \
            systemd libserver-starter-perl \
            lua-sec lua-cqueues lua-redis lua-http redis-server openssl lua5.1
DEPS_FUZZ = $(DEPS_RUN) clang libclang-rt-14-dev
DEPS_BENCH = python3 wrk hyperfine nginx-light unicorn gunicorn nodejs libpoe-perl \
             libhttp-message-perl chiark-utils-bin chiark-scripts \
             libio-fdpass-perl gnuplot-nox
DEPS = $(DEPS_TEST)

# install the Debian packages of the list $(1) that are missing; apt
# needs root (or sudo)
define install
@missing=""; for p in $(1); do \
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" \
    || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  echo "installing:$$missing"; \
  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
  $$sudo apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
fi
endef

.PHONY: all deps run test test-only asan valgrind fuzz fuzz-run bench chaos install clean

all: $(CORE) $(CLIENT)

$(BUILD)/obj/%.o: src/%.c $(wildcard src/*.h)
	@mkdir -p $(dir $@)
	@echo "CC $<"; $(CC) $(ALL_CFLAGS) -c -o $@ $<

$(CORE): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(LIBFLAG) -Wl,-z,now -o $@ $(OBJS) $(EV_LDFLAGS) $(EV_LIBS) $(LDFLAGS)

$(CLIENT): $(CLIENT_SRCS) lua-prefork/client.h src/wire.h
	@mkdir -p $(dir $@)
	$(CC) $(CLIENT_CFLAGS) $(CLIENT_STATIC) -o $@ $(CLIENT_SRCS) $(LDFLAGS) $(NETTLE_LIBS)

# what the test suite needs (make deps DEPS="..." installs another list)
deps:
	$(call install,$(DEPS))

# serve examples/http.lua on HOST:PORT
PORT = 8080
HOST = 127.0.0.1
run:
	$(call install,$(DEPS_RUN))
	@$(MAKE) --no-print-directory all
	$(TEST_ENV) $(LUA) examples/http.lua $(PORT) $(HOST)

test: deps all
	@$(MAKE) --no-print-directory test-only

# the whole suite against an ASan+UBSan build (gcc's runtimes, preloaded
# into the uninstrumented lua5.4)
asan: deps
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  LDFLAGS="-fsanitize=address,undefined" CLIENT_STATIC= all
	ASAN_OPTIONS=detect_leaks=1:exitcode=99 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=99 \
	SPEC_LUA="env LD_PRELOAD=$$($(CC) -print-file-name=libasan.so):$$($(CC) -print-file-name=libubsan.so) $(LUA)" \
	$(MAKE) --no-print-directory BUILD=build-asan SPEC_TIMEOUT=300 test-only

# memcheck over the suite; valgrind follows the Lua processes only (no
# vgdb: its /tmp files, left by killed processes, collide with a later
# process of another user that gets the same pid)
valgrind: deps all
	$(call install,valgrind)
	SPEC_LUA="valgrind -q --vgdb=no --error-exitcode=99 --child-silent-after-fork=yes --leak-check=full --show-possibly-lost=no --errors-for-leak-kinds=definite $(LUA)" \
	$(MAKE) --no-print-directory SPEC_TIMEOUT=900 test-only

test-only:
	$(TEST_ENV) SPEC_TIMEOUT=$(SPEC_TIMEOUT) sh spec/run.sh

# side by side with nginx, Node cluster, unicorn, gunicorn, POE: writes
# bench/results.md and bench/results.png (BENCH_ARGS=--quick: one round)
BENCH_ARGS =
bench: deps all
	$(call install,$(DEPS_BENCH))
	$(TEST_ENV) $(LUA) bench/bench.lua $(BENCH_ARGS)

# kill -9, HUP and TERM under load, CHAOS_SECONDS each
CHAOS_SECONDS = 30
chaos: deps all
	$(TEST_ENV) $(LUA) bench/chaos.lua $(CHAOS_SECONDS)

install: all
	install -d $(DESTDIR)$(LIBDIR)/prefork $(DESTDIR)$(LUADIR)/prefork
	install -m 0755 $(CORE) $(DESTDIR)$(LIBDIR)/prefork/core.so
	install -m 0644 $(LUASRC) $(DESTDIR)$(LUADIR)/prefork/
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 $(CLIENT) $(DESTDIR)$(BINDIR)/lua-prefork

clean:
	rm -rf build build-asan

# libFuzzer targets (clang; Debian's libclang-rt) for every parser of
# outside input; FUZZ_SECONDS each, from the seed corpus in fuzz/corpus/
FUZZ_TARGETS = http_request conn_read fd_frame serial pool_frame
# standalone targets (no Lua harness): the prefork-interp wire (src/wire.c)
FUZZ_C_TARGETS = interp_greeting interp_request interp_env wire_roundtrip
FUZZ_SECONDS = 60
FUZZ_CC = clang
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined

# the module's sources once, instrumented, for every target
FUZZ_LIB = $(BUILD)/fuzz/libprefork.a
FUZZ_OBJS = $(SRCS:src/%.c=$(BUILD)/fuzz/obj/%.o)

$(BUILD)/fuzz/obj/%.o: src/%.c $(wildcard src/*.h)
	@mkdir -p $(dir $@)
	@echo "CC (fuzz) $<"; $(FUZZ_CC) -std=c11 -D_GNU_SOURCE -I$(LUA_INCDIR) \
	  -g -O1 -fsanitize=fuzzer-no-link,address,undefined \
	  -fno-sanitize-recover=undefined -c -o $@ $<

$(FUZZ_LIB): $(FUZZ_OBJS)
	@rm -f $@; ar rcs $@ $(FUZZ_OBJS)

fuzz:
	$(call install,$(DEPS_FUZZ))
	@$(MAKE) --no-print-directory fuzz-run

fuzz-run: $(FUZZ_LIB)
	@for t in $(FUZZ_TARGETS); do \
	  $(FUZZ_CC) -std=c11 -D_GNU_SOURCE -I$(LUA_INCDIR) $(FUZZ_FLAGS) \
	    -o $(BUILD)/fuzz/$$t fuzz/$$t.c $(FUZZ_LIB) -llua$(LUA_VERSION) -lev || exit 1; \
	done
	@for t in $(FUZZ_C_TARGETS); do \
	  $(FUZZ_CC) -std=c11 -D_GNU_SOURCE $(FUZZ_FLAGS) \
	    -o $(BUILD)/fuzz/$$t fuzz/$$t.c src/wire.c || exit 1; \
	done
	@for t in $(FUZZ_TARGETS) $(FUZZ_C_TARGETS); do \
	  mkdir -p $(BUILD)/fuzz/corpus-$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  if ! $(BUILD)/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	      -rss_limit_mb=2048 -max_len=65536 -artifact_prefix=$(BUILD)/fuzz/$$t- \
	      $(BUILD)/fuzz/corpus-$$t fuzz/corpus/$$t >$(BUILD)/fuzz/$$t.log 2>&1; then \
	    tail -n 40 $(BUILD)/fuzz/$$t.log; \
	    echo "fuzz $$t: a crash; the input is in $(BUILD)/fuzz/"; exit 1; \
	  fi; \
	  grep -E "^Done" $(BUILD)/fuzz/$$t.log; \
	done; echo "fuzz: no crash"
