# bench/peers/mp_pool.py N: Python multiprocessing, 2 workers, the trivial
# job, one call per task (chunksize=1); prints "calls/s <figure>".
import multiprocessing, sys, time

def ident(x):
    return x

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    with multiprocessing.Pool(2) as pool:
        pool.map(ident, range(4), chunksize=1)  # both workers up
        t0 = time.monotonic()
        out = pool.map(ident, range(n), chunksize=1)
        dt = time.monotonic() - t0
    assert len(out) == n
    print("calls/s %.0f" % (n / dt))
