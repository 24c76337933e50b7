"""Are the GEMMs beside the exchange slower? Reads the traces of ``bench_sp.py --profile --trace T`` (one per rank).

    python3 bench/trace_gemms.py T-mindiesd-2-rank0.json T-mindiesd-2-rank1.json

Per rank: the side stream's kernels (the symmetric-memory barriers of ``all_gather_peers``) and the copies, then the
cuBLAS (``nvjet``) kernels of the compute stream grouped by kernel and grid and by whether a side-stream kernel
and a copy ran beside them: count, median us and total ms of each group (groups over 5 ms).
"""
import collections
import json
import statistics
import sys


def overlaps(e, others):
    a, b = e["ts"], e["ts"] + e["dur"]
    return any(o["ts"] < b and o["ts"] + o["dur"] > a for o in others)


def main(paths):
    for path in paths:
        events = json.load(open(path))["traceEvents"]
        kernels = [e for e in events if e.get("cat") == "kernel"]
        copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
        busy = collections.Counter()
        for e in kernels:
            busy[e["args"].get("stream")] += e["dur"]
        compute = busy.most_common(1)[0][0]
        side = [e for e in kernels if e["args"].get("stream") != compute]
        print(path.split("/")[-1], "compute stream", compute, "side kernels:",
              collections.Counter(e["name"][:50] for e in side).most_common(4))
        if side:
            durs = [e["dur"] for e in side]
            print(f"  side kernels us: n {len(durs)} median {statistics.median(durs):.1f} max {max(durs):.1f} "
                  f"sum {sum(durs):.0f}")
        print("  copies:",
              collections.Counter((e["name"][:30], e["args"].get("stream")) for e in copies).most_common(4))
        groups = collections.defaultdict(list)
        for e in kernels:
            if e["args"].get("stream") == compute and "nvjet" in e["name"]:
                key = (e["name"][-40:], str(e["args"].get("grid")), "barrier" if overlaps(e, side) else "-",
                       "copy" if overlaps(e, copies) else "-")
                groups[key].append(e["dur"])
        for (name, grid, barrier, copy), durs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            if sum(durs) > 5000:
                print(f"  {name:40s} grid {grid:14s} {barrier:8s} {copy:5s} n={len(durs):4d} "
                      f"median {statistics.median(durs):8.1f} us  sum {sum(durs) / 1e3:7.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
