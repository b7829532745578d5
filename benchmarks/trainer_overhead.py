"""The package's `train()` (HF Trainer) vs a plain PyTorch loop: tokens/s side by side, same model, tokens and settings.

The `smoke` preset (GPT-2 4 layers x 128 wide, vocabulary 50257, micro batch 8 x 64, QAdamW, cosine schedule, gradient
clipping, eval every 25 steps on 32 blocks, log every 5; here a checkpoint every 25 steps, twice the preset's rate, so
that a short run holds one) on PTB. The two loops run in one process and
step alternately (the plain loop takes one step inside a callback after each Trainer step), so a change in the load
of a shared CPU hits both alike; each step's time includes the log / eval / save due at it, and the window (steps
`--warm`..`--steps`) holds the evaluation and the checkpoint at step 25. `--profile` prints the top of a
cProfile of the run. Target: `train()` >= 0.95x the plain loop's tokens/s."""
import cProfile, io, pstats, shutil, statistics, tempfile
from _common import parser, setup, machine, markdown_table, write_section
from _loops import train_vs_plain
from quantstudy.config import preset

TARGET = 0.95

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each loop")
    p.add_argument("--warm", type=int, default=4, help="steps left out of the timing window")
    p.add_argument("--profile", action="store_true", help="print the top 30 functions (by own time) of a cProfile")
    args = p.parse_args()
    setup(args)
    cfg = preset("smoke", max_steps=args.steps, save_every=25)
    tmp = tempfile.mkdtemp(prefix="trainer_overhead-")
    prof = cProfile.Profile() if args.profile else None
    try:
        if prof: prof.enable()
        r = train_vs_plain(cfg, tmp, warm=args.warm)
        if prof:
            prof.disable(); s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue())
    finally: shutil.rmtree(tmp, ignore_errors=True)
    ratio = r["ratio"]
    per_step = [r["plain_s"][k - 1] / r["trainer_s"][k] for k in range(args.warm + 1, args.steps + 1)]
    rows = [["train()", f"{r['train_tokens_per_s']:.0f}", ratio, f">= {TARGET} {'met' if ratio >= TARGET else 'missed'}"],
            ["plain loop", f"{r['plain_tokens_per_s']:.0f}", 1.0, ""]]
    table = markdown_table(["loop", "tokens/s", "/ plain loop", "target"], rows)
    print(table)
    print(f"median per-step ratio {statistics.median(per_step):.3f}; last val loss: train() {r['train_val_loss'][-1]:.4f}, "
          f"plain {r['plain_val_loss'][-1]:.4f}")
    if not args.no_write:
        write_section("trainer_overhead", f"## trainer_overhead.py: `train()` (HF Trainer) vs a plain PyTorch loop, smoke preset\n\n"
                      f"{machine(args.device)}; the two loops alternate step by step in one process, {args.steps} steps each, "
                      f"timed over steps {args.warm + 1}-{args.steps} (the evaluation and a checkpoint at step 25 inside); "
                      f"median per-step ratio {statistics.median(per_step):.3f}.\n\n{table}", args.device)

if __name__ == "__main__": main()
