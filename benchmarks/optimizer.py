"""QAdamW step time vs `torch.optim.AdamW(foreach=True)`, and the optimizer state it stores.

Parameters and gradients shaped like GPT-2 small's (`quantstudy.optim.gpt2_small_params`); on a CPU by default a
2-layer, 8192-token-vocabulary cut of it (as notebook 03 does; `--full` for all 124M parameters).
Targets: QAdamW with nothing quantized within 1.2x of AdamW(foreach=True); with 8-bit m and v within 2x."""
import torch
from _common import parser, setup, interleaved, machine, markdown_table, write_section
from quantstudy.optim import QAdamW, gpt2_small_params

CANDIDATES = {"AdamW(foreach=True)": None, "QAdamW, fp32 moments": "fp32", "QAdamW m8-channel": "m8-channel",
              "QAdamW m8-channel_v8-channel": "m8-channel_v8-channel", "QAdamW m4-channel_v4-channel": "m4-channel_v4-channel"}
TARGETS = {"QAdamW, fp32 moments": 1.2, "QAdamW m8-channel_v8-channel": 2.0}

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="all of GPT-2 small (124M parameters) on a CPU too")
    args = p.parse_args()
    setup(args)
    kw = {} if args.full or args.device.startswith("cuda") else dict(n_layer=2, vocab=8192)
    opts = {}
    for name, oq in CANDIDATES.items():
        groups = gpt2_small_params(args.device, **kw)
        opts[name] = (torch.optim.AdamW(groups, lr=6e-4, foreach=True) if oq is None
                      else QAdamW(groups, lr=6e-4, optim_quant=None if oq == "fp32" else oq))
    n_params = sum(p.numel() for g in opts["AdamW(foreach=True)"].param_groups for p in g["params"])
    res = interleaved({k: o.step for k, o in opts.items()}, reps=args.reps or 11, min_time=0.0, device=args.device)
    adamw_bytes = sum(t.nbytes for s in opts["AdamW(foreach=True)"].state.values() for t in s.values() if torch.is_tensor(t))
    rows = []
    for name, (t, ratio) in res.items():
        nbytes = adamw_bytes if name.startswith("AdamW") else opts[name].state_bytes()
        target = TARGETS.get(name)
        rows.append([name, f"{t * 1e3:.1f}", ratio, f"{nbytes / 2**20:.1f}", nbytes / adamw_bytes,
                     "" if target is None else f"<= {target} {'met' if ratio <= target else 'missed'}"])
    table = markdown_table(["optimizer", "ms / step", "time / AdamW", "state MiB", "state / AdamW", "target"], rows)
    print(table)
    if not args.no_write:
        write_section("optimizer", f"## optimizer.py: one optimizer step on {n_params / 1e6:.1f}M GPT-2-small-shaped parameters"
                      f"{'' if not kw else ' (2 layers, vocabulary 8192)'}\n\n{machine(args.device)}; median of "
                      f"{args.reps or 11} interleaved steps.\n\n{table}", args.device)

if __name__ == "__main__": main()
