"""`fake_quantize` at GPT-2 small shapes, as a multiple of `dst.copy_(src)` of the same tensor (the memory floor).

Columns: `fused` is `fake_quantize` as the library runs it once compiled (the default policy compiles a kind of call
after 2^28 elements; here it is compiled up front), `eager` the same arithmetic in eager ops (QUANTSTUDY_COMPILE=0).
Target: fused within 2x of the copy at fp32 for per-tensor and per-row (channel of W, token of X) scales."""
import torch
from _common import parser, setup, interleaved, machine, markdown_table, write_section
from quantstudy.quantizers import fake_quantize, _fake_quantize_eager
from quantstudy.fused import set_compile_policy

SHAPES = {"W 768x768": (768, 768), "W 3072x768": (3072, 768), "X 8192x768": (8192, 768), "X 8192x3072": (8192, 3072)}
GRANULARITIES = {"W": [("tensor", None), ("channel", 0)], "X": [("tensor", None), ("token", 0), ("channel", 1)]}

def main():
    args = parser(__doc__.split("\n")[0]).parse_args()
    setup(args)
    set_compile_policy(enabled=True, min_numel=0, after_numel=0)
    dev, reps = args.device, args.reps or 15
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for label, shape in SHAPES.items():
            x = torch.randn(shape, device=dev).to(dtype)
            dst = torch.empty_like(x)
            for gran, axis in GRANULARITIES[label[0]]:
                r = interleaved({"copy": lambda: dst.copy_(x), "fused": lambda: fake_quantize(x, 8, axis),
                                 "eager": lambda: _fake_quantize_eager(x, 8, axis, True)}, reps=reps, device=dev)
                target = "<= 2" if dtype == torch.float32 and gran in ("tensor", "channel" if label[0] == "W" else "token") else ""
                met = "" if not target else ("met" if r["fused"][1] <= 2 else "missed")
                rows.append([str(dtype).removeprefix("torch."), label, gran, f"{r['copy'][0] * 1e3:.3f}",
                             r["fused"][1], r["eager"][1], f"{target} {met}".strip()])
                print(*rows[-1], sep="\t", flush=True)
    headers = ["dtype", "tensor", "scales", "copy ms", "fused / copy", "eager / copy", "target"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_write:
        write_section("quantizers", f"## quantizers.py: 8-bit `fake_quantize` / `dst.copy_(src)`\n\n{machine(dev)}; "
                      f"median of {reps} interleaved repetitions.\n\n{table}", dev)

if __name__ == "__main__": main()
