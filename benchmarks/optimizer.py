"""QAdamW step time vs `torch.optim.AdamW(foreach=True)`, and the optimizer state it stores.

Parameters and gradients shaped like GPT-2 small's (`_common.gpt2_small_params`); on a CPU by default a
2-layer, 8192-token-vocabulary cut of it (as notebook 03 does; `--full` for all 124M parameters).
Targets: QAdamW with nothing quantized within 1.2x of AdamW(foreach=True); with 8-bit m and v within 2x.

`--torchao` adds torchao's `AdamW8bit` / `AdamW4bit` (optional: `pip install torchao`, the `bench` extra; skipped
when absent) beside QAdamW's schemes of the same bits (notebook 03a), in the same interleaved run; `--train` compares
their final loss on notebook 03's char-level LM (Tiny Shakespeare from $QUANTSTUDY_DATA), same seed and batches.
Goals: 8-bit m+v state <= 0.26x AdamW's bytes, 4-bit <= 0.14x; QAdamW's step no slower than torchao's at the same bits."""
import importlib.util, os
from pathlib import Path
import torch
from _common import parser, setup, interleaved, machine, markdown_table, write_section, gpt2_small_params
from quantstudy.optim import QAdamW

CANDIDATES = {"AdamW(foreach=True)": None, "QAdamW, fp32 moments": "fp32", "QAdamW m8-channel": "m8-channel",
              "QAdamW m8-channel_v8-channel": "m8-channel_v8-channel", "QAdamW m4-channel_v4-channel": "m4-channel_v4-channel"}
TARGETS = {"QAdamW, fp32 moments": 1.2, "QAdamW m8-channel_v8-channel": 2.0}

# torchao's optimizers and the QAdamW schemes that store the same thing: bnb's dynamic maps in blocks of 256 (8-bit);
# dynamic m and zero-excluded linear v in blocks of 128 (4-bit); plus Li et al.'s rank-1 v
SAME_BITS = {"torchao AdamW8bit": ("8bit", "QAdamW m8-block256-dynamic_v8-block256-udynamic"),
             "torchao AdamW4bit": ("4bit", "QAdamW m4-block128-dynamic_v4-block128-nozero")}
QADAMW_LOWBIT = ("m8-block256-dynamic_v8-block256-udynamic", "m4-block128-dynamic_v4-block128-nozero", "m4-block128-dynamic_v4-rank1-nozero")
STATE_GOALS = {8: 0.26, 4: 0.14}

def have_torchao() -> bool:
    return importlib.util.find_spec("torchao") is not None

def torchao_optimizer(kind: str, groups, lr=6e-4):
    "torchao.optim.AdamW8bit or AdamW4bit (torchao's defaults: block 256 / 128; states of tensors under 4096 elements stay fp32)."
    import torchao.optim as tao
    return (tao.AdamW8bit if kind == "8bit" else tao.AdamW4bit)(groups, lr=lr)

def stored_bytes(opt) -> int:
    "Bytes of an optimizer's state: plain tensors, and every inner tensor (codes, scales, code table) of torchao's subclasses."
    if isinstance(opt, QAdamW): return opt.state_bytes()
    n = 0
    for s in opt.state.values():
        for v in s.values():
            if not torch.is_tensor(v): continue
            attrs = getattr(v, "tensor_attrs", None)
            n += sum(getattr(v, a).nbytes for a in attrs) if attrs else v.nbytes
    return n

def _bits(name: str) -> int | None:
    return 8 if "8bit" in name or "m8-block" in name else 4 if "4bit" in name or "m4-block" in name else None

def bench_torchao(args, kw):
    "Step time and state bytes of torchao's low-bit AdamW beside QAdamW's schemes, each a ratio to AdamW(foreach=True)."
    names = {"AdamW(foreach=True)": None, **{f"QAdamW {oq}": oq for oq in QADAMW_LOWBIT},
             "torchao AdamW8bit": "8bit", "torchao AdamW4bit": "4bit"}
    opts = {}
    for name, what in names.items():
        groups = gpt2_small_params(args.device, **kw)
        if what is None: opts[name] = torch.optim.AdamW(groups, lr=6e-4, foreach=True)
        elif name.startswith("torchao"): opts[name] = torchao_optimizer(what, groups)
        else: opts[name] = QAdamW(groups, lr=6e-4, optim_quant=what)
    n_params = sum(p.numel() for g in opts["AdamW(foreach=True)"].param_groups for p in g["params"])
    res = interleaved({k: o.step for k, o in opts.items()}, reps=args.reps or 7, min_time=0.0, device=args.device)
    adamw = stored_bytes(opts["AdamW(foreach=True)"])
    rows = []
    for name, (t, ratio) in res.items():
        nbytes, bits = stored_bytes(opts[name]), _bits(name)
        goal = "" if bits is None else f"<= {STATE_GOALS[bits]} {'met' if nbytes / adamw <= STATE_GOALS[bits] else 'missed'}"
        vs = ""
        for tao, (_, q) in SAME_BITS.items():
            if name == q: vs = f"{res[name][0] / res[tao][0]:.2f}x {tao}'s time"
        rows.append([name, f"{t * 1e3:.1f}", ratio, f"{nbytes / n_params:.3f}", nbytes / adamw, goal, vs])
    table = markdown_table(["optimizer", "ms / step", "time / AdamW", "state bytes / param", "state / AdamW", "state goal", "QAdamW vs torchao"], rows)
    return n_params, table

def _char_data():
    from quantstudy.data import require_data_root
    path = require_data_root("optimizer.py --train") / "tinyshakespeare" / "input.txt"
    text = path.read_text()[:200_000]
    chars = sorted(set(text))
    return chars, torch.tensor([chars.index(ch) for ch in text])

def train_char_lm(make_opt, steps=200, seed=0):
    "Notebook 03's char-level LM (8 characters of context, 256-unit GELU MLP), fixed batches: train losses and a held-out loss."
    chars, ids = _char_data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(len(chars), 32), torch.nn.Flatten(), torch.nn.Linear(8 * 32, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, len(chars)))
    decay = [p for p in model.parameters() if p.dim() == 2]
    opt = make_opt([{"params": decay, "weight_decay": 0.1}, {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
    g, losses = torch.Generator().manual_seed(seed), []
    split = int(0.9 * len(ids))
    batch = lambda i: (ids[i[:, None] + torch.arange(8)], ids[i + 8])
    for _ in range(steps):
        x, y = batch(torch.randint(0, split - 9, (128,), generator=g))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss): losses.append(float("inf")); break
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    with torch.no_grad():
        x, y = batch(torch.arange(split, len(ids) - 9, 7))
        held = torch.nn.functional.cross_entropy(model(x), y).item()
    return losses, held

def train_comparison(steps: int) -> str:
    "Final losses of AdamW, QAdamW's 8- and 4-bit schemes and torchao's AdamW8bit / AdamW4bit on the char LM."
    runs = {"AdamW": lambda g: torch.optim.AdamW(g, lr=3e-3), "QAdamW fp32": lambda g: QAdamW(g, lr=3e-3),
            "QAdamW m8-channel_v8-channel (paper)": lambda g: QAdamW(g, lr=3e-3, optim_quant="m8-channel_v8-channel")}
    runs.update({f"QAdamW {oq}": (lambda oq: lambda g: QAdamW(g, lr=3e-3, optim_quant=oq))(oq) for oq in QADAMW_LOWBIT})
    if have_torchao(): runs.update({f"torchao AdamW{k}": (lambda k: lambda g: torchao_optimizer(k, g, lr=3e-3))(k) for k in ("8bit", "4bit")})
    rows, ref = [], None
    for name, make in runs.items():
        losses, held = train_char_lm(make, steps)
        tail = sum(losses[-20:]) / len(losses[-20:])
        if ref is None: ref = held
        rows.append([name, len(losses), f"{tail:.4f}", f"{held:.4f}", f"{held - ref:+.4f}"])
    return markdown_table(["optimizer", "steps", "train loss (mean of last 20)", "held-out loss", "vs AdamW"], rows)

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="all of GPT-2 small (124M parameters) on a CPU too")
    p.add_argument("--torchao", action="store_true", help="torchao's AdamW8bit/AdamW4bit beside QAdamW's low-bit schemes")
    p.add_argument("--train", type=int, default=0, metavar="STEPS", help="with --torchao: char-LM training comparison of STEPS steps")
    args = p.parse_args()
    setup(args)
    if args.torchao: return main_torchao(args)
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

def main_torchao(args):
    kw = {} if args.full or args.device.startswith("cuda") else dict(n_layer=2, vocab=8192)
    parts = [f"{machine(args.device)}."]
    if not have_torchao():
        print("torchao is not installed (pip install torchao, or the `bench` extra): skipping the torchao comparison")
        return
    import torchao
    n_params, table = bench_torchao(args, kw)
    print(table)
    parts.append(f"torchao {torchao.__version__}. One optimizer step on {n_params / 1e6:.1f}M GPT-2-small-shaped parameters"
                 f"{'' if not kw else ' (2 layers, vocabulary 8192)'}, median of {args.reps or 7} interleaved steps, after one "
                 f"warm-up step (torchao compiles its step per shape with torch.compile then).\n\n{table}")
    if args.train:
        t = train_comparison(args.train); print(t)
        parts.append(f"Training: notebook 03's char-level LM on Tiny Shakespeare, {args.train} steps, lr 3e-3, batch 128, same seed and "
                     f"batches for every optimizer; held-out loss on the last 10% of the text.\n\n{t}")
    if not args.no_write: write_section("optimizer-torchao", "## optimizer.py --torchao: QAdamW's low-bit schemes beside torchao\n\n" + "\n\n".join(parts), args.device)

if __name__ == "__main__": main()
