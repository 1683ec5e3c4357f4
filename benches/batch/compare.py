#!/usr/bin/env python3
"""Rows per second scoring the same data set with digits_mlp against one bundled backend,
side by side in one run: `switchyard batch`, a straightforward synchronous tritonclient
loop, tritonclient's asyncio gRPC API at the same concurrency, and perf_analyzer's
throughput at its best concurrency (which measures but keeps no answers). Every client
sends 64-row requests (the model's max_batch_size). Prints a table and ratios.

Run by benches/batch/run.sh, which makes the venv, installs perf_analyzer and builds the
release binary. Usage: compare.py BINARY PERF_ANALYZER [--rows N] [--concurrency C] [--reps R]
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

# `switchyard batch`'s rows/s while it calls (its summary's `phases.score_s`: without
# reading the input and writing the output).
SEND_PHASE = []
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BATCH = 64


def pinned(cpu, argv):
    """argv on one CPU when taskset exists and the machine has two or more."""
    if os.cpu_count() and os.cpu_count() >= 2 and subprocess.run(["which", "taskset"], capture_output=True).returncode == 0:
        return ["taskset", "-c", str(cpu)] + argv
    return argv


def start_backend(binary):
    proc = subprocess.Popen(
        pinned(1, [binary, "backend", "--model-repository", os.path.join(ROOT, "backends/model_repository"),
                   "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(r"grpc=(\S+)", line)
    if not m:
        proc.kill()
        sys.exit(f"backend did not start: {line!r}")
    return proc, m.group(1)


def dataset(n):
    with open(os.path.join(ROOT, "backends/sample_data/digits_holdout.json")) as f:
        features = np.array(json.load(f)["features"], dtype=np.float32)
    reps = -(-n // len(features))
    return np.tile(features, (reps, 1))[:n]


def switchyard(binary, url, path, out, concurrency):
    started = time.perf_counter()
    run = subprocess.run(
        pinned(0, [binary, "batch", "-i", path, "-o", out, "-m", "digits_mlp", "-u", url,
                   "-c", str(concurrency), "--json", "--overwrite"]),
        capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"switchyard batch failed: {run.stderr}")
    summary = json.loads(run.stdout)
    assert summary["rows_ok"] == summary["rows"], summary
    SEND_PHASE.append(summary["rows"] / summary["phases"]["score_s"])
    return summary["rows"] / wall


def sync_loop(url, x):
    client = grpcclient.InferenceServerClient(url)
    started = time.perf_counter()
    answers = []
    for i in range(0, len(x), BATCH):
        chunk = x[i:i + BATCH]
        inp = grpcclient.InferInput("INPUT__0", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        r = client.infer("digits_mlp", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
        answers.append(r.as_numpy("probabilities"))
    out = np.concatenate(answers)
    wall = time.perf_counter() - started
    assert out.shape == (len(x), 10)
    client.close()
    return len(x) / wall


async def async_loop(url, x, concurrency):
    client = aioclient.InferenceServerClient(url)
    gate = asyncio.Semaphore(concurrency)

    async def one(i):
        async with gate:
            chunk = x[i:i + BATCH]
            inp = aioclient.InferInput("INPUT__0", list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk)
            r = await client.infer("digits_mlp", [inp], outputs=[aioclient.InferRequestedOutput("probabilities")])
            return r.as_numpy("probabilities")

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(i) for i in range(0, len(x), BATCH)))
    out = np.concatenate(answers)
    wall = time.perf_counter() - started
    assert out.shape == (len(x), 10)
    await client.close()
    return len(x) / wall


def perf_analyzer(pa, url, concurrencies):
    """The best throughput (rows/s: perf_analyzer counts infer/sec as requests × batch size)."""
    best = (0.0, 0)
    with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
        run = subprocess.run(
            pinned(0, [pa, "-m", "digits_mlp", "-u", url, "-i", "grpc", "-b", str(BATCH),
                       "--concurrency-range", concurrencies, "--measurement-interval", "2000",
                       "--stability-percentage", "50", "-f", csv.name]),
            capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            sys.exit(f"perf_analyzer failed: {run.stdout[-2000:]} {run.stderr[-2000:]}")
        lines = open(csv.name).read().splitlines()
    header = lines[0].split(",")
    ci, ti = header.index("Concurrency"), header.index("Inferences/Second")
    for row in lines[1:]:
        cells = row.split(",")
        best = max(best, (float(cells[ti]), int(cells[ci])))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("perf_analyzer")
    ap.add_argument("--rows", type=int, default=64_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pa-concurrency", default="1:16:3")
    args = ap.parse_args()
    proc, url = start_backend(args.binary)
    try:
        x = dataset(args.rows)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.npy")
            np.save(path, x)
            out = os.path.join(d, "out.npz")
            # One warm-up of each, then interleaved repetitions.
            switchyard(args.binary, url, path, out, args.concurrency)
            sync_loop(url, x[:6400])
            asyncio.run(async_loop(url, x[:6400], args.concurrency))
            results = {"switchyard batch": [], "tritonclient sync loop": [], "tritonclient asyncio": []}
            for _ in range(args.reps):
                results["switchyard batch"].append(switchyard(args.binary, url, path, out, args.concurrency))
                results["tritonclient sync loop"].append(sync_loop(url, x))
                results["tritonclient asyncio"].append(asyncio.run(async_loop(url, x, args.concurrency)))
        pa, pa_c = perf_analyzer(args.perf_analyzer, url, args.pa_concurrency)
    finally:
        proc.kill()
        proc.wait()
    ours = statistics.median(results["switchyard batch"])
    print(f"digits_mlp, {args.rows} rows, {BATCH} rows per request, concurrency {args.concurrency}, "
          f"{args.reps} interleaved reps (median), backend on CPU 1, clients on CPU 0")
    print(f"{'client':<34}{'rows/s':>12}{'switchyard ÷ it':>18}")
    for name, v in results.items():
        m = statistics.median(v)
        print(f"{name:<34}{m:>12.0f}{ours / m:>18.2f}   runs: {', '.join(f'{r:.0f}' for r in v)}")
    print(f"{'perf_analyzer (best, c=' + str(pa_c) + ')':<34}{pa:>12.0f}{ours / pa:>18.2f}   (keeps no answers)")
    phase = statistics.median(SEND_PHASE[1:])
    print(f"switchyard batch while it calls (summary phases.score_s, no file read or written): {phase:.0f} rows/s"
          f" = {phase / statistics.median(results['tritonclient asyncio']):.2f} × asyncio, {phase / pa:.2f} × perf_analyzer's best")
    print("switchyard batch's wall time is the whole process: reading the .npy, the journal and its"
          " fsynced checkpoints, writing the .npz; the Python loops keep their answers in memory.")


if __name__ == "__main__":
    main()
