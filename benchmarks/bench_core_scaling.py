"""How far two processes can scale on this machine: the ceiling of any 1 -> 2 worker speed-up.

Runs the same CPU-bound work (a U-Net-sized torch convolution step, one torch thread; and a pure-Python
loop, as the GIL-bound vector work) once alone, then in two processes at once, and reports
``2 x alone / together`` for each: 2.0 means two cores that do not slow each other; the 2-worker refresh
cannot beat this figure (plus whatever its serial parts cost).
Usage: python benchmarks/bench_core_scaling.py [--seconds 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402


def torch_work(n: int) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
    )
    x = torch.randn(4, 4, 128, 128)
    t = time.perf_counter()
    for _ in range(n):
        conv(x).sum().backward()
    return time.perf_counter() - t


def python_work(n: int) -> float:
    t = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += (i * 7) % 13
    return time.perf_counter() - t


def _calibrate(fn, seconds: float) -> int:
    n = 1
    while fn(n) < seconds / 4:
        n *= 2
    return int(n * seconds / max(fn(n), 1e-9))


def _together(fn, n: int) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.apply(fn, (1,))  # imports done before timing
        t = time.perf_counter()
        pool.starmap(fn, [(n,), (n,)])
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="Length of one run alone.")
    ap.add_argument("--repeat", type=int, default=3, help="Pairs of (alone, two at once), interleaved.")
    args = ap.parse_args()
    out = {"machine": machine(), "work": {}}
    for name, fn in (("torch_conv_1_thread", torch_work), ("python_loop", python_work)):
        n = _calibrate(fn, args.seconds)
        pairs = [(fn(n), _together(fn, n)) for _ in range(args.repeat)]  # interleaved: drift hits both
        ceilings = sorted(2 * a / t for a, t in pairs)
        out["work"][name] = {"pairs_s": pairs, "speedup_ceiling": ceilings}
        print(
            f"{name}: alone / two at once {', '.join(f'{a:.1f}/{t:.1f}' for a, t in pairs)} s -> ceiling "
            f"median {statistics.median(ceilings):.2f}x (range {ceilings[0]:.2f}-{ceilings[-1]:.2f})"
        )
    path = Path(__file__).parent / "results" / f"bench_core_scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"machine {out['machine']}; saved {path}")


if __name__ == "__main__":
    main()
