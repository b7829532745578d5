"""One training step (forward, backward, optimizer) of a quantized GPT-2 vs the baseline, as ratios.

CPU: the `smoke` preset's model and micro batch (fp32). GPU: GPT-2 `small` with the `paper` preset's micro batch
(16 x 1024 tokens) under bf16 autocast. Every recipe uses QAdamW (`quantstudy.optim.make_optimizer`); the baseline
is also timed with `torch.optim.AdamW(foreach=True)` for reference. Targets: w8a8g8 within 1.15x of the baseline
at smoke size on a CPU, within 1.10x at `small` on a GPU."""
import contextlib
import torch
from _common import parser, setup, interleaved, machine, markdown_table, write_section
import quantstudy.fused as fz
from quantstudy.model import build_model, Recipe
from quantstudy.qlinear import LinearQuant
from quantstudy.optim import OptimQuant
from quantstudy.config import preset
from quantstudy.optim import make_optimizer

W8A8 = dict(weight="8-channel", act="8-token")
RECIPES = {
    "baseline (QAdamW)": (None, {}),
    "baseline, AdamW(foreach=True)": (None, dict(adamw=True)),
    "w8a8": (Recipe(linear=LinearQuant(**W8A8)), {}),
    "w8a8g8": (Recipe(linear=LinearQuant(**W8A8, grad="8-token")), {}),
    "w8a8g8, eager quantizers (QUANTSTUDY_COMPILE=0)": (Recipe(linear=LinearQuant(**W8A8, grad="8-token")), dict(eager=True)),
    "w8a8g8, int8 kernel": (Recipe(linear=LinearQuant(**W8A8, grad="8-token", kernel="int8")), {}),
    "m8+v8 (8-channel)": (Recipe(optim=OptimQuant(m="8-channel", v="8-channel")), {}),
}

def make_step(cfg, recipe, device, adamw=False, eager=False, bf16=False):
    model = build_model(cfg.size, recipe, seed=cfg.seed, n_positions=cfg.block_size, resid_pdrop=cfg.dropout,
                        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **cfg.model).to(device).train()
    opt = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True) if adamw
           else make_optimizer(model, cfg, recipe)[0])
    ids = torch.randint(0, model.config.vocab_size, (cfg.micro_batch_size, cfg.block_size), device=device)
    def step():
        with fz.using_compile_policy(enabled=False) if eager else contextlib.nullcontext():
            with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    args = p.parse_args()
    setup(args)
    fz.set_compile_policy(after_numel=0)   # the steady state: the default policy compiles a kind of call after 2^28 elements (~10 smoke steps)
    gpu = args.device.startswith("cuda")
    cfg = preset("paper") if gpu else preset("smoke")
    steps = {name: make_step(cfg, r, args.device, bf16=gpu, **kw) for name, (r, kw) in RECIPES.items()}
    for _ in range(args.warmup - 1):
        for f in steps.values(): f()
    reps = args.reps or 7
    res = interleaved(steps, reps=reps, min_time=0.0, device=args.device)
    base = res["baseline (QAdamW)"][0]
    targets = {"w8a8g8": 1.10 if gpu else 1.15}
    rows = []
    for name, (t, ratio) in res.items():
        target = targets.get(name)
        rows.append([name, f"{t * 1e3:.1f}", ratio, "" if target is None else f"<= {target:.2f} {'met' if ratio <= target else 'missed'}"])
    table = markdown_table(["recipe", "ms / step", "/ baseline", "target"], rows)
    print(table)
    print("compiled quantizer kinds:", sorted(k[:3] for k in fz._ready))
    size = (f"GPT-2 {cfg.size}, micro batch {cfg.micro_batch_size} x {cfg.block_size}, bf16 autocast" if gpu else
            f"smoke preset: GPT-2 {', '.join(f'{k}={v}' for k, v in cfg.model.items())}, vocab 50257, micro batch "
            f"{cfg.micro_batch_size} x {cfg.block_size}, fp32")
    if not args.no_write:
        write_section("step", f"## step.py: one training step, {size}\n\n{machine(args.device)}; median of {reps} interleaved "
                      f"steps after {args.warmup} warm-up steps; fused quantizers compiled from the first step.\n\n{table}", args.device)

if __name__ == "__main__": main()
