# bench/peers/mp_pool.py MODE N [ARG]: Python multiprocessing, Pool(2),
# the same jobs as bench/pool.lua; prints "<unit> <figure>".
#   calls N        pool.map(chunksize=1) of the trivial job: calls/s
#   map N [CS]     pool.map of the trivial job, default chunksize (or CS)
#   kb N [CS]      pool.map of the trivial job over N strings of 1 KB
import multiprocessing, sys, time

def ident(x):
    return x

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "calls"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200000
    cs = int(sys.argv[3]) if len(sys.argv) > 3 else None
    job, items = ident, range(n)
    if mode == "calls":
        cs = 1
    if mode == "kb":
        base = ("abcdefghijklmnop" * 64)[:1000]
        items = [base + "%024d" % i for i in range(n)]
    with multiprocessing.Pool(2) as pool:
        pool.map(ident, range(4), chunksize=1)  # both workers up
        t0 = time.monotonic()
        out = pool.map(job, items, chunksize=cs)
        dt = time.monotonic() - t0
    assert len(out) == n
    print("%s %.0f" % ("calls/s" if mode == "calls" else "items/s", n / dt))
