"Shared helpers of the benchmark scripts: side-by-side timing, machine description, RESULTS.md sections."
from __future__ import annotations
import argparse, datetime, os, platform, re, statistics, sys, time
from pathlib import Path
import torch
from quantstudy.host import tune_cpu_allocator

RESULTS = Path(__file__).with_name("RESULTS.md")

def gpt2_small_params(device="cpu", n_layer=12, d=768, vocab=50257, ctx=1024):
    "Random parameters (with random gradients) shaped like GPT-2 small's, in two param groups: matrices decay, vectors do not."
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer): shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    ps = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p) * 1e-3
    return [{"params": [p for p in ps if p.dim() == 2], "weight_decay": 0.1}, {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]

def parser(description: str) -> argparse.ArgumentParser:
    "The options every script takes."
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of each candidate (interleaved)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p

def setup(args):
    "Apply --threads, tune the CPU allocator, seed."
    if args.threads: torch.set_num_threads(args.threads)
    if args.device == "cpu": tune_cpu_allocator()
    torch.manual_seed(0)

def sync(device: str):
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

def interleaved(fns: dict, reps: int = 15, min_time: float = 0.02, device: str = "cpu") -> dict:
    """Time each callable in `fns` round robin, `reps` times: {name: (median seconds per call, median ratio to the first)}.

    Every repetition times all candidates back to back, so a change of machine load (other processes on a shared CPU)
    hits them alike; the ratio is taken within each repetition, then its median over repetitions."""
    s, names = sync(device), list(fns)
    number = {}
    for n in names:   # warm up (and compile), then calls per block so that a block lasts about min_time
        fns[n](); s()
        t0 = time.perf_counter(); fns[n](); s(); dt = max(time.perf_counter() - t0, 1e-7)
        number[n] = max(1, int(min_time / dt))
    times = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            f, k = fns[n], number[n]
            t0 = time.perf_counter()
            for _ in range(k): f()
            s(); times[n].append((time.perf_counter() - t0) / k)
    ref = times[names[0]]
    return {n: (statistics.median(times[n]), statistics.median(a / b for a, b in zip(times[n], ref))) for n in names}

def cpu_isa(flags: set) -> str:
    "What decides CPU int8 and fp32 speed, from /proc/cpuinfo flags: AVX-512 (VNNI, AMX) or AVX2 only."
    if "avx512f" not in flags: return "AVX2, no AVX-512/VNNI" if "avx2" in flags else "no AVX2"
    extra = [name for flag, name in (("avx512_vnni", "VNNI"), ("amx_int8", "AMX")) if flag in flags]
    return "AVX-512" + (f" with {' and '.join(extra)}" if extra else ", no VNNI")

def machine(device: str = "cpu") -> str:
    "One line: the device (a CPU with its ISA), CPU threads, torch version and the date."
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()): cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"): flags = set(line.split(":", 1)[1].split()); break
    except OSError: pass
    dev = torch.cuda.get_device_name() if str(device).startswith("cuda") else f"CPU {cpu} ({cpu_isa(flags)}), {os.cpu_count()} cores"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} threads{load}; "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")

def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])

def write_section(name: str, body: str, device: str = "cpu"):
    "Replace the section `name` of RESULTS.md (one per script and device kind), keeping the others."
    key = f"{name}:{'gpu' if str(device).startswith('cuda') else 'cpu'}"
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder (see README.md); every figure is a ratio of timings taken side by side in one run.\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda m: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(f"wrote section {key} of {RESULTS}")
