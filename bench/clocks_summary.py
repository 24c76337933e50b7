"""GPU clocks and power while a benchmark runs: did the cards run at the same SM clock in the compared runs?

Sampled on the device beside the runs, every ~0.2 s (one CSV row per GPU: epoch s, index, SM MHz, memory MHz, W, C,
utilization %), each run's start and end written to a marks file ("name start end"):

    ( while true; do nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv,noheader,nounits | sed "s/^/$(date +%s.%N), /"; sleep 0.2; done ) > smi.csv &
    a=$(date +%s.%N); torchrun ... bench/bench_sp.py ...; echo "1gpu $a $(date +%s.%N)" >> marks.txt

    python3 bench/clocks_summary.py smi.csv marks.txt

Per run and GPU: the medians over the samples with utilization >= 90 % (the timed calls; compiling leaves the GPU
mostly idle).
"""
import csv
import statistics
import sys


def main(samples_csv, marks_txt):
    rows = [r for r in csv.reader(open(samples_csv)) if len(r) >= 7]
    for name, start, end in (line.split() for line in open(marks_txt) if line.strip()):
        for gpu in sorted({r[1].strip() for r in rows}):
            busy = [r for r in rows if r[1].strip() == gpu and float(start) <= float(r[0]) <= float(end)
                    and float(r[6]) >= 90]
            if busy:
                med = lambda i: statistics.median(float(r[i]) for r in busy)  # noqa: E731
                print(f"{name} gpu{gpu}: busy samples {len(busy)}, median SM {med(2):.0f} MHz, mem {med(3):.0f} MHz, "
                      f"power {med(4):.0f} W, temp {med(5):.0f} C")


if __name__ == "__main__":
    main(*sys.argv[1:3])
