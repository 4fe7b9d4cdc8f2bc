"""The engine on a busy machine: default threads against one thread, with 0, 1 and 2 busy co-runner processes.

    python benches/busy.py [--corunners 0 1 2] [--only NAME ...] [--rounds N] [--block SECONDS]
    python benches/busy.py --timeline NAME

A co-runner is a Python process spinning on a core (started here and stopped at the end). For each number of
co-runners, the shipped character model's `forward` over 100 tokens (what `lstm-engine bench` times as
"whole sequence") and the workloads of peers.py run with the model's default threads ("default"), with
threads=1 ("one") and with threads=1 again ("again"; the same model, its threads set before each block; streaming
workloads step a session of their own in each), in many short rounds: each round times a block of
each of the three (about --block seconds), in an order that turns round by round, so that every arm sees the same
minutes of the machine. Each round gives two paired ratios, default / one and one / again (the A/A check: two
runs of the same code, whose spread is the noise of the method).

A row prints the median of each ratio over the rounds with its 95 % bootstrap interval (rounds resampled) and a
verdict: "slower" when default / one's whole interval lies above 1 and above the A/A interval, "faster" when below
both, else "same (noise)". The A/A interval should contain 1; when it does not, the arms were not timed alike and
the row says so ("A/A off"). Issue 12: default / one at most 1.3 for the character model with 2 co-runners on
2 cores (its verdict reads "met" when the whole interval is at or below 1.3), and no workload "slower". `split` is
the share of the default arm's pool jobs that ran on more than one thread (cpu_info()["pool"]). Load averages
(1 minute) are read before and after each row: others' processes are part of the load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

import lstm_engine as le  # noqa: E402
from lstm_engine import _kernels  # noqa: E402
from lstm_engine.cli import SHIPPED_MODEL, _random_input  # noqa: E402

ARMS = ("default", "one", "again")


def pool_jobs() -> tuple[int, int]:
    """The pool's jobs so far that asked for more than one thread, and those that got it."""
    stats = _kernels.pool_stats()
    return stats["asked"], stats["split"]


def timed_block(f: Callable[[], object], block: float) -> float:
    """Microseconds per call of f, calling it for `block` seconds of wall time. Every arm's block lasts the same
    time: beside busy processes a short block often fits in one scheduler slice and a long one spans the waits
    between slices, so blocks of a fixed count of calls (of different lengths) timed the arms differently
    (ratios of 0.1 and 8 between two arms running the same code)."""
    n = 0
    t0 = now = time.perf_counter()
    while now - t0 < block:
        f()
        n += 1
        now = time.perf_counter()
    return (now - t0) / n * 1e6


def rounds(model, calls: dict[str, tuple[int, Callable[[], object]]], n_rounds: int, block: float,
           split: Callable[[], tuple[int, int]] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Microseconds per call of each arm in each round (arrays of n_rounds). An arm is (threads, call): the
    model's threads are set to it before the arm's block, so every arm runs the same weights at the same
    addresses (two model objects differ by a few per cent on their own, from where their weights lie). Arms are
    timed in turn, the order turned by one arm each round. Also the share of the first arm's pool jobs that ran
    split (NaN when none asked for a second thread)."""
    names = list(calls)

    def arm(k):
        model.threads = calls[k][0]
        return calls[k][1]

    for k in names:
        arm(k)()  # warm up: sessions made, buffers touched
    out = {k: np.empty(n_rounds) for k in names}
    jobs = [0, 0]
    for i in range(n_rounds):
        for j in range(len(names)):
            k = names[(i + j) % len(names)]
            f = arm(k)
            before = split() if split and k == names[0] else None
            out[k][i] = timed_block(f, block)
            if before is not None:
                after = split()
                jobs[0] += after[0] - before[0]
                jobs[1] += after[1] - before[1]
    return out, (jobs[1] / jobs[0] if jobs[0] else float("nan"))


def median_interval(ratios: np.ndarray, rng: np.random.Generator, resamples: int = 4000) -> tuple[float, float, float]:
    """The median of per-round ratios and its 95 % bootstrap interval (percentile method, rounds resampled)."""
    picks = rng.integers(0, len(ratios), (resamples, len(ratios)))
    medians = np.median(ratios[picks], axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return float(np.median(ratios)), float(lo), float(hi)


def verdict(ratio: tuple[float, float, float], noise: tuple[float, float, float], limit: float = 1.0) -> str:
    """"slower" / "faster" when the whole interval is above / below both 1 and the A/A interval; against a
    limit other than 1 (the character model's 1.3), "met" / "missed" when it is at or below / above the limit;
    "A/A off" when the A/A interval misses 1."""
    _, lo, hi = ratio
    if limit == 1.0:
        said = "slower" if lo > max(1, noise[2]) else "faster" if hi < min(1, noise[1]) else "same (noise)"
    else:
        said = f"≤ {limit}: " + ("met" if hi <= limit else "missed" if lo > limit else "undecided (noise)")
    return said if noise[1] <= 1 <= noise[2] else said + "; A/A off"


def cases(only: list[str] | None) -> dict[str, tuple[object, tuple[tuple[int, Callable[[], object]], ...]]]:
    """name -> (model, the arms: (its default threads, a call), (1, a call), (1, another call)). A streaming
    workload's arms each step their own session of the model."""
    out = {}
    if not only or "charlm-100" in only:
        model = le.load(SHIPPED_MODEL)
        ids = _random_input(model, 1, 100, np.random.default_rng(0))
        call = lambda model=model: model.forward(ids)  # noqa: E731 (this model: the name is reused below)
        out["charlm-100"] = (model, ((model.threads, call), (1, call), (1, call)))
    for w in wl.WORKLOADS:
        if only and w.name not in only:
            continue
        model = wl.engine_model(w, wl.make_weights(w))
        x = wl.make_inputs(w)[0]
        runs = [wl.engine_runner(w, model) for _ in ARMS]
        out[w.name] = (model, tuple((threads, lambda run=run, x=x: run(x))
                                    for threads, run in zip((model.threads, 1, 1), runs)))
    return out


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def timeline(name: str, phases: list[tuple[int, float]], window: float) -> None:
    """One model with its default threads called without a break while co-runners come and go (phases of
    (co-runners, seconds)): per window, µs per call, the share of its pool jobs split and whether the pool
    held the machine for contended at the window's end: how soon it went to one thread and came back."""
    model, arms = cases([name])[name]
    call = arms[0][1]
    call()
    print(f"{name}, default threads ({model.threads}), windows of {window * 1e3:.0f} ms")
    print("| s | co-runners | µs per call | split | contended | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    t_start = time.perf_counter()
    for n, seconds in phases:
        procs = spinners(n)
        try:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                asked, split = pool_jobs()
                us = timed_block(call, window)
                asked2, split2 = pool_jobs()
                share = "–" if asked2 == asked else f"{(split2 - split) / (asked2 - asked):.0%}"
                print(f"| {time.perf_counter() - t_start:.1f} | {n} | {us:,.1f} | {share} | "
                      f"{int(_kernels.pool_stats()['contended_now'])} | {os.getloadavg()[0]:.1f} |", flush=True)
        finally:
            stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corunners", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="charlm-100 and/or workload names (default: all but batch-large)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--block", type=float, default=0.03, help="seconds per timed block of one arm, about")
    parser.add_argument("--timeline", metavar="NAME", help="instead: NAME with default threads, called without a "
                        "break for 2 s alone, 3 s beside 2 co-runners, 4 s alone, printed per 100 ms")
    args = parser.parse_args()
    info = le.cpu_info()
    print(f"{info['cpu']}; kernels {info['variant']}; default threads {info['threads']} ({info['threads_reason']})")
    if args.timeline:
        timeline(args.timeline, [(0, 2.0), (2, 3.0), (0, 4.0)], 0.1)
        return
    only = args.only or ["charlm-100"] + [w.name for w in wl.WORKLOADS if w.name != "batch-large"]
    print(f"{args.rounds} rounds of {args.block * 1e3:.0f} ms blocks")
    todo = cases(only)
    rng = np.random.default_rng(0)
    print("| co-runners | case | default µs | 1 thread µs | default / 1 thread [95 %] | 1 / 1 again, A/A [95 %] "
          "| verdict | split | load before → after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.corunners:
        procs = spinners(n)
        try:
            time.sleep(0.5)
            for name, (model, arms) in todo.items():
                load = os.getloadavg()[0]
                us, split = rounds(model, dict(zip(ARMS, arms)), args.rounds, args.block, pool_jobs)
                ratio = median_interval(us["default"] / us["one"], rng)
                noise = median_interval(us["one"] / us["again"], rng)
                limit = 1.3 if name == "charlm-100" and n == 2 else 1.0
                share = "–" if split != split else f"{split:.0%}"  # NaN: no job asked for a second thread
                print(f"| {n} | {name} | {np.median(us['default']):,.1f} | {np.median(us['one']):,.1f} | "
                      f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}] | {noise[0]:.2f} [{noise[1]:.2f}, "
                      f"{noise[2]:.2f}] | {verdict(ratio, noise, limit)} | {share} | {load:.1f} → "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
        finally:
            stop(procs)


if __name__ == "__main__":
    main()
