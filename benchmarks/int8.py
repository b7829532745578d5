"""The INT8 linear (`LinearQuant(kernel="int8")`) vs the plain linear layer: fp32 on a CPU, bf16 autocast on a GPU.

Recipe w8-channel a8-token g8-token with the paper's backward: the forward product runs on int8 codes
(`torch._int_mm`), the backward products in high precision (see notebook 01). Also timed: the same recipe with the
fake-quantized kernel, and the bare products (`torch._int_mm` vs `mm`). Target (GPUs only): int8 faster than bf16
at GPT-2 medium and large shapes. On a CPU the speed of `_int_mm` depends on the build and the ISA (oneDNN with
AVX512-VNNI / AMX is fast, other paths can be far slower than fp32), so there is no target; the last column says."""
import contextlib
import torch
import torch.nn as nn
from _common import parser, setup, interleaved, machine, markdown_table, write_section
from quantstudy.qlinear import LinearQuant, QuantLinear
from quantstudy.fused import set_compile_policy

RECIPE = dict(weight="8-channel", act="8-token", grad="8-token")
LAYERS = {"medium": 1024, "large": 1280, "small": 768}   # GPT-2 widths; each block has d->3d, d->d, d->4d, 4d->d

def shapes(size):
    d = LAYERS[size]
    return {f"{size} c_attn {d}->{3 * d}": (d, 3 * d), f"{size} c_fc {d}->{4 * d}": (d, 4 * d), f"{size} mlp.c_proj {4 * d}->{d}": (4 * d, d)}

def measure(dev: str, tokens: int, sizes, reps: int = 7, verbose: bool = True) -> list[list]:
    "One row per layer shape of `sizes`: base ms, fake / base and int8 / base (forward, forward+backward), _int_mm / mm."
    gpu = dev.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    base_name = "bf16 linear" if gpu else "fp32 linear"
    rows = []
    for size in sizes:
        for label, (d_in, d_out) in shapes(size).items():
            lin = nn.Linear(d_in, d_out, device=dev)
            layers = {base_name: lin, "fake w8a8g8": QuantLinear.from_linear(lin, LinearQuant(**RECIPE)),
                      "int8 w8a8g8": QuantLinear.from_linear(lin, LinearQuant(**RECIPE, kernel="int8"))}
            x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
            g = torch.randn(tokens, d_out, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
            def fwd(layer):
                def f():
                    with torch.no_grad(), amp(): layer(x)
                return f
            def fwd_bwd(layer):
                def f():
                    with amp(): y = layer(x)
                    y.backward(g)
                    x.grad = lin.weight.grad = lin.bias.grad = None
                return f
            a8 = torch.randint(-127, 128, (tokens, d_in), dtype=torch.int8, device=dev)
            w8 = torch.randint(-127, 128, (d_out, d_in), dtype=torch.int8, device=dev)
            af = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
            wf = torch.randn(d_out, d_in, device=dev, dtype=af.dtype)
            mm = interleaved({"mm": lambda: af @ wf.t(), "int_mm": lambda: torch._int_mm(a8, w8.t())}, reps=reps, device=dev)
            f = interleaved({k: fwd(l) for k, l in layers.items()}, reps=reps, device=dev)
            fb = interleaved({k: fwd_bwd(l) for k, l in layers.items()}, reps=reps, device=dev)
            rows.append([label, f"{f[base_name][0] * 1e3:.2f}", f["fake w8a8g8"][1], f["int8 w8a8g8"][1],
                         f"{fb[base_name][0] * 1e3:.2f}", fb["fake w8a8g8"][1], fb["int8 w8a8g8"][1], mm["int_mm"][1]])
            if verbose: print(*rows[-1], sep="\t", flush=True)
    return rows

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="rows of X (default: 8192 on a GPU, 1024 on a CPU)")
    args = p.parse_args()
    setup(args)
    set_compile_policy(after_numel=0)   # quantizers compiled from the start (the default waits 2^28 elements)
    dev, gpu = args.device, args.device.startswith("cuda")
    tokens = args.tokens or (8192 if gpu else 1024)
    sizes = ("medium", "large") if gpu else ("small", "medium")
    base_name = "bf16 linear" if gpu else "fp32 linear"
    rows = measure(dev, tokens, sizes, args.reps or 7)
    headers = ["layer", f"{base_name} fwd ms", "fake / base fwd", "int8 / base fwd", f"{base_name} fwd+bwd ms",
               "fake / base fwd+bwd", "int8 / base fwd+bwd", "_int_mm / mm"]
    table = markdown_table(headers, rows)
    print(table)
    if gpu:
        met = all(r[3] < 1 for r in rows) and all(r[6] < 1 for r in rows)
        verdict = f"Target (int8 faster than bf16, forward and forward+backward, medium and large): {'met' if met else 'missed'}."
    else:
        import statistics
        r = statistics.median(row[-1] for row in rows)
        verdict = (f"No target on a CPU. Here `torch._int_mm` takes {r:.2f}x the time of the fp32 `mm` of the same shape "
                   f"({'faster' if r < 1 else 'slower'}; last column), so the int8 forward takes "
                   f"{statistics.median(row[3] for row in rows):.2f}x the fp32 forward; with the paper's backward the two "
                   "backward products stay fp32.")
    if not args.no_write:
        write_section("int8", f"## int8.py: INT8 linear vs {base_name}, {tokens} tokens\n\n{machine(dev)}; median of "
                      f"{args.reps or 7} interleaved repetitions; ratios are times relative to the {base_name}.\n\n{table}\n\n{verdict}", dev)

if __name__ == "__main__": main()
