"""One prepared GPU check: the CUDA paths proven and the GPU figures measured in one run (issue 14).

    python benchmarks/gpu_check.py OUT_DIR            # on a CUDA machine: every stage, under 7 minutes on an H100/H200
    python benchmarks/gpu_check.py OUT_DIR --tiny     # on a CPU in seconds: the same code paths at tiny sizes (CI)

Stages, in order (each prints `PASS|FAIL|SKIP name: figure` lines; a stage that overruns its time budget is stopped
and says so; `--only` reruns some): correctness (CUDA vs eager vs the CPU fp32 reference), bf16 training (50 steps of
GPT-2 small), throughput (`train()` and a plain loop, eager and compiled, MFU; the quantized recipes), int8
(`benchmarks/int8.py` at medium/large shapes), optimizer (QAdamW vs fused AdamW: time and measured state memory),
memory (peak memory by category, Figs 2/14/15; linear-layer time share, Fig. 3). Writes OUT_DIR/gpu_check.json
(every figure, the device, torch and CUDA versions); a real CUDA run (never `--tiny`) also rewrites the
`gpu_check:gpu` section of benchmarks/RESULTS.md. Needs only torch, transformers (+ accelerate, which its Trainer
needs), safetensors, numpy and this package: see benchmarks/README.md for a bare GPU machine."""
from __future__ import annotations
import argparse, contextlib, datetime, gc, json, math, os, platform, signal, statistics, sys, tempfile, time, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import torch.nn as nn
from _common import interleaved, markdown_table, write_section, gpt2_small_params
from _loops import plain_loop, run_train, synthetic_datasets
import quantstudy.quantizers as qz
import quantstudy.fused as fz
from quantstudy.analysis.linear_time import block_time_share
from quantstudy.analysis.memory import MEMORY_CATEGORIES, _fresh_model, profile_step_memory
from quantstudy.model import Recipe, build_model, gpt2_config
from quantstudy.optim import OptimQuant, QAdamW, make_optimizer
from quantstudy.qlinear import LinearQuant, QuantLinear, int8_matmul, _pad_operands
from quantstudy.host import cpu_name, tune_cpu_allocator
from quantstudy.rundir import write_json
from quantstudy.config import TrainConfig

PEAK_BF16 = 989e12   # H100 SXM dense bf16 FLOP/s (datasheet); the H200 has the same tensor cores and clocks
W8A8 = dict(weight="8-channel", act="8-token")
RECIPES = {"baseline": None, "w8a8": Recipe(linear=LinearQuant(**W8A8)),
           "w8a8g8": Recipe(linear=LinearQuant(**W8A8, grad="8-token")),
           "w8a8g8 int8": Recipe(linear=LinearQuant(**W8A8, grad="8-token", kernel="int8")),
           "m8v8": Recipe(optim=OptimQuant(m="8-channel", v="8-channel"))}
GOALS = {"baseline MFU, compiled": ">= 45%", "train() / plain loop": ">= 0.9x", "w8a8g8 / baseline step": "<= 1.05x",
         "int8 / bf16 forward (medium, large)": "< 1", "m8v8 / fused AdamW step": "<= 2x", "m8v8 / AdamW state memory": "<= 0.26x"}

# sizes: the real check, and --tiny (a CPU in seconds, the same code paths)
FULL = dict(size="small", model={}, ctx=1024, train_batch=8, train_steps=50, tput_batch=16, tput_steps=30, tput_warm=10,
            tokens=4096, d=768, int8_tokens=8192, int8_sizes=("medium", "large"), opt=dict(),
            mem_models=("small", "medium"), mem_batches=(1, 4, 16, 2, 8),   # the figure's ends first: a stopped stage keeps them lin_sizes=("small", "medium", "large", "xl"),
            lin_seqs=(256, 512, 1024, 2048, 4096), lin_batch=8, reps=7, compile="inductor", lr=6e-4, fall=0.5,
            budgets=dict(correctness=45, training=60, throughput=170, int8=40, optimizer=25, memory=45, linear_time=25))
TINY = dict(size="tiny", model=dict(n_layer=2, n_head=2, n_embd=64), ctx=32, train_batch=4, train_steps=8, tput_batch=4,
            tput_steps=6, tput_warm=2, tokens=64, d=96, int8_tokens=32, int8_sizes=("small",),
            opt=dict(n_layer=1, d=64, vocab=512, ctx=64), mem_models=("tiny",), mem_batches=(1, 2),
            lin_sizes=("tiny",), lin_seqs=(32, 64), lin_batch=2, reps=2, compile="eager", lr=3e-3, fall=0.0,
            budgets=dict(correctness=240, training=240, throughput=240, int8=240, optimizer=240, memory=240, linear_time=240))

class StageTimeout(Exception): pass

class Report:
    "The PASS/FAIL/SKIP lines and every figure, written to gpu_check.json after each stage."
    def __init__(self, path: Path, meta: dict): self.path, self.doc, self.stage = path, dict(meta, checks=[], stages={}), None
    def add(self, status: str, name: str, figure: str, **data):
        print(f"{status} {name}: {figure}", flush=True)
        self.doc["checks"].append(dict(status=status, name=name, figure=figure, stage=self.stage, **data))
    def save(self): write_json(self.path, self.doc)
    def ok(self, cond: bool, name: str, figure: str, **data): self.add("PASS" if cond else "FAIL", name, figure, **data)

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "||a - b|| / ||b|| in float64 on the CPU (NaN where either is not finite)."
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()): return math.nan
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()

# ---- 1. correctness ----------------------------------------------------------------------------------------------
def stage_correctness(R: Report, S: dict, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    # (a) the compiled quantizer: bit-identical to eager on the device and to eager fp32 on the CPU
    variants = [(0, True, "token"), (1, True, "channel"), (None, True, "tensor"), (0, False, "token asym")]
    if dev.type == "cpu": variants = variants[:1]   # each variant is a C++ compile (seconds) on a CPU
    for dtype in (torch.float32, torch.bfloat16):
        for axis, sym, label in variants:
            x_cpu = (torch.randn(S["tokens"], S["d"], generator=g) * 3 + (0.5 if not sym else 0)).to(dtype)
            x = x_cpu.to(dev)
            with fz.using_compile_policy(enabled=True, min_numel=0, after_numel=0):
                fused = fz.try_fused(x, 8, axis, sym, "fake")
            eager, ref = qz._fake_quantize_eager(x, 8, axis, sym), qz._fake_quantize_eager(x_cpu, 8, axis, sym)
            name = f"fake_quantize compiled {label} {str(dtype)[6:]}"
            if fused is None:
                R.add("FAIL", name, f"the compiled kernel did not run ({fz._broken.get(dev.type, 'policy')})"); continue
            same_dev, same_cpu = torch.equal(fused, eager), torch.equal(eager.cpu(), ref)
            R.ok(same_dev and same_cpu, name, f"bit-identical to eager on {dev.type}: {same_dev}, eager on {dev.type} "
                 f"to the CPU reference: {same_cpu} ({(fused.cpu() != ref).sum().item()} of {ref.numel()} differ)")
    # (b) QuantLinear forward/backward on the device vs the CPU, per recipe; fp32 and bf16 autocast
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
    recipes = {"w8a8": LinearQuant(**W8A8), "w8a8g8": LinearQuant(**W8A8, grad="8-token"),
               "w4a4g4 tensor": LinearQuant(weight="4-tensor", act="4-tensor", grad="4-tensor"),
               "w8a8g8 int8": LinearQuant(**W8A8, grad="8-token", kernel="int8")}
    d_in, d_out, n = S["d"], 2 * S["d"], S["tokens"]
    x0, g0 = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    lin0 = nn.Linear(d_in, d_out)
    def run(q, device, amp):
        lin = nn.Linear(d_in, d_out, device=device); lin.load_state_dict(lin0.state_dict())
        x = x0.to(device).requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            y = QuantLinear.from_linear(lin, q)(x)
        y.backward(g0.to(device, y.dtype))
        return [t.float().cpu() for t in (y, x.grad, lin.weight.grad, lin.bias.grad)]
    for name, q in recipes.items():
        ref = run(q, torch.device("cpu"), False)
        for dtype in (torch.float32, torch.bfloat16):
            amp = dtype == torch.bfloat16
            if amp and dev.type == "cpu": continue   # bf16 autocast of the package is a CUDA path
            got = run(q, dev, amp)
            errs = [rel(a, b) for a, b in zip(got, ref)]
            R.ok(all(e <= tol[dtype] for e in errs), f"QuantLinear {name} {str(dtype)[6:]} {dev.type} vs CPU fp32",
                 "rel. error y, dx, dW, db = " + ", ".join(f"{e:.1e}" for e in errs) + f" (tolerance {tol[dtype]:.0e})", errors=errs)
    # (c) the int8 product: torch._int_mm exact against the integer reference, odd shapes padded
    for m, k, nn_ in ((n, d_in, d_out), (37, 72, 40)):
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (nn_, k), generator=g, dtype=torch.int8)
        exact = a.double() @ b.double().t()
        ones_a, ones_b = torch.ones(m, 1, device=dev), torch.ones(1, nn_, device=dev)
        pa, pb, *_ = _pad_operands(a.to(dev), b.to(dev).t(), ones_a, ones_b, None) if dev.type == "cuda" else (a, b.t())
        raw = torch._int_mm(pa, pb)[:m, :nn_].double().cpu()
        via = int8_matmul(a.to(dev), b.to(dev).t(), ones_a, ones_b).double().cpu()   # |sum| < 2^24: exact in fp32 too
        R.ok(torch.equal(raw, exact) and torch.equal(via, exact), f"_int_mm exact {m}x{k}x{nn_}",
             f"raw int32: {torch.equal(raw, exact)}, int8_matmul (padding, epilogue): {torch.equal(via, exact)}")
    q8 = LinearQuant(**W8A8, grad="8-token")
    lin = nn.Linear(d_in, d_out, device=dev); x = x0.to(dev)
    with torch.no_grad():
        y_fake = QuantLinear.from_linear(lin, q8)(x).double()
        y_int8 = QuantLinear.from_linear(lin, LinearQuant(**W8A8, grad="8-token", kernel="int8"))(x).double()
        qa, qw = q8.act(x, "act").double().abs(), q8.weight(lin.weight, "weight").double().abs()
        bound = d_in * 2 ** -23 * (qa @ qw.t()) + 1e-6   # fp32 rounding of the fake path's float product
    worst = ((y_int8 - y_fake).abs() / bound).max().item()
    R.ok(worst <= 1, "LinearQuant(kernel='int8') vs fake fp32", f"max |int8 - fake| / fp32 rounding bound = {worst:.2f} (<= 1)")
    # (d) QAdamW on the device vs the CPU: codes identical, parameters within 1e-6
    for oq in ("m8-channel_v8-channel", "m4-channel_v4-channel"):
        groups_cpu = gpt2_small_params("cpu", **(dict(n_layer=1, d=256, vocab=1024, ctx=64) if dev.type == "cuda" else S["opt"]))
        grads = [[p.grad.clone() for p in gr["params"]] for gr in groups_cpu]
        groups_dev = [dict(gr, params=[nn.Parameter(p.detach().clone().to(dev)) for p in gr["params"]]) for gr in groups_cpu]
        opts = [QAdamW(gs, lr=1e-3, optim_quant=oq) for gs in (groups_cpu, groups_dev)]
        for _ in range(3):
            for gs in (groups_cpu, groups_dev):
                for gr, gg in zip(gs, grads):
                    for p, gp in zip(gr["params"], gg): p.grad = gp.to(p.device)
            for o in opts: o.step()
        pc = [p for gr in groups_cpu for p in gr["params"]]; pd = [p for gr in groups_dev for p in gr["params"]]
        dp = max((a.detach().cpu() - b.detach()).abs().max().item() for a, b in zip(pd, pc))
        codes = [(opts[1].moment_codes(b, nm).cpu() != opts[0].moment_codes(a, nm)).sum().item()
                 for a, b in zip(pc, pd) if a.dim() == 2 for nm in ("exp_avg", "exp_avg_sq")]
        R.ok(sum(codes) == 0 and dp <= 1e-6, f"QAdamW {oq} {dev.type} vs CPU, 3 steps",
             f"{sum(codes)} codes differ; max |param difference| {dp:.1e} (<= 1e-6)")
    # (e) attention: sdpa vs eager; (f) flash-attn vs sdpa where a wheel for this torch imports
    ids = torch.randint(0, 50257, (2, S["ctx"]), generator=g).to(dev)
    def logits(impl, amp):
        m = build_model(S["size"], seed=0, attn_implementation=impl, **S["model"]).to(dev).eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            return m(input_ids=ids).logits.float()
    for amp in ((False, True) if dev.type == "cuda" else (False,)):
        e = rel(logits("sdpa", amp), logits("eager", amp))
        t = 5e-2 if amp else 1e-4   # 12 layers of reordered sums: ~1e-6 in fp32, bf16 rounding (4e-3) compounds
        R.ok(e <= t, f"attention sdpa vs eager {'bf16' if amp else 'fp32'}", f"rel. error of the logits {e:.1e} (<= {t:.0e})")
    try:
        import flash_attn   # noqa: F401
        have_flash = dev.type == "cuda"
        why = "flash-attn runs on CUDA only"
    except Exception as ex:
        have_flash, why = False, f"flash_attn does not import ({type(ex).__name__}): no wheel for torch {torch.__version__} was carried"
    if have_flash:
        e = rel(logits("flash_attention_2", True), logits("sdpa", True))
        R.ok(e <= 5e-2, "attention flash-attn vs sdpa bf16", f"rel. error of the logits {e:.1e} (<= 5e-2)")
    else: R.add("SKIP", "attention flash-attn vs sdpa", why)

# ---- 2. bf16 training ------------------------------------------------------------------------------------------
def train_cfg(S, steps, batch, **kw) -> TrainConfig:
    return TrainConfig(size=S["size"], model=S["model"], block_size=S["ctx"], batch_size=batch, micro_batch_size=batch,
                       max_steps=steps, warmup_steps=max(1, steps // 5), eval_every=steps, eval_blocks=batch, log_every=1,
                       save_every=10 ** 6, lr=S["lr"], **kw)

def stage_training(R: Report, S: dict, dev: torch.device):
    cfg = train_cfg(S, S["train_steps"], S["train_batch"])
    data = synthetic_datasets(cfg, (S["train_steps"] + 1) * cfg.batch_size * cfg.block_size)
    fixed_v = [f for f in OptimQuant.__dataclass_fields__ if "fixed" in f]
    runs = {k: v for k, v in RECIPES.items() if k != "w8a8g8 int8"}
    curves = {}
    for name, recipe in runs.items():
        r = plain_loop(cfg, recipe, data, device=dev)
        curves[name] = losses = r["train_loss"]
        k = max(1, len(losses) // 5)
        first, last = losses[0], statistics.mean(losses[-k:])
        finite = all(math.isfinite(v) for v in losses + r["val_loss"])
        R.ok(finite and last < first - S["fall"], f"bf16 training {name}, {cfg.max_steps} steps" if dev.type == "cuda" else f"training {name}",
             f"loss {first:.3f} -> {last:.3f} (mean of the last {k}; goal: {S['fall']} lower); finite: {finite}", losses=losses, val=r["val_loss"])
        del r
    if not fixed_v: R.add("SKIP", "bf16 training fixed-v scheme", "quantstudy.optim.OptimQuant has no fixed-v option")
    if dev.type == "cuda":
        r = plain_loop(cfg.replace(precision="fp32"), None, data, device=dev)
        k = max(1, len(r["train_loss"]) // 5)
        a, b = statistics.mean(curves["baseline"][-k:]), statistics.mean(r["train_loss"][-k:])
        R.ok(abs(a - b) <= 0.03 * b, "bf16 baseline vs fp32, same steps", f"mean loss of the last {k} steps {a:.4f} vs "
             f"{b:.4f}: {abs(a - b) / b:.2%} apart (<= 3%)", fp32=r["train_loss"])

# ---- 3. throughput ---------------------------------------------------------------------------------------------
def flops_per_token(config, ctx: int) -> float:
    "6 N + 12 L T d (PaLM, appendix B): N the parameters without the position embeddings (the tied wte counted once)."
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    n = V * d + L * (12 * d * d + 13 * d) + 2 * d
    return 6 * n + 12 * L * ctx * d

def matmul_peak(dev) -> float | None:
    "Measured bf16 FLOP/s of an 8192^3 product (random data, median of 10 after 3 warm-ups)."
    if dev.type != "cuda": return None
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192 ** 3 / statistics.median(ts)

def stage_throughput(R: Report, S: dict, dev: torch.device, tmp: Path):
    cfg = train_cfg(S, S["tput_steps"], S["tput_batch"], dropout=0.1).replace(log_every=5, eval_blocks=S["tput_batch"])
    data = synthetic_datasets(cfg, (S["tput_steps"] + 1) * cfg.batch_size * cfg.block_size)
    fpt = flops_per_token(gpt2_config(S["size"], **S["model"]), S["ctx"])
    peak = matmul_peak(dev)
    if peak: R.add("PASS", "bf16 matmul 8192^3", f"{peak / 1e12:.0f} TFLOP/s measured (datasheet {PEAK_BF16 / 1e12:.0f})", flops=peak)
    rates = {}
    mfu = lambda r: r * fpt / PEAK_BF16
    def pair(comp):
        tag = f"compiled ({comp})" if comp else "eager"
        tr = run_train(cfg, tmp / f"train-{comp}", None, data, warm=S["tput_warm"], compile_backend=comp)["tokens_per_s"]
        pl = plain_loop(cfg, None, data, warm=S["tput_warm"], compile_backend=comp, device=dev)["tokens_per_s"]
        rates[f"train() {tag}"], rates[f"plain {tag}"] = tr, pl
        R.ok(tr >= 0.9 * pl, f"train() / plain loop, baseline {tag}", f"{tr / pl:.3f} ({tr:,.0f} vs {pl:,.0f} tokens/s; goal >= 0.9)",
             train_tokens_per_s=tr, plain_tokens_per_s=pl)
        R.add("PASS" if dev.type != "cuda" or comp is None or mfu(pl) >= 0.45 else "FAIL", f"MFU baseline {tag}",
              f"plain loop {mfu(pl):.1%}, train() {mfu(tr):.1%} of {PEAK_BF16 / 1e12:.0f} TFLOP/s"
              + (f" ({pl * fpt / peak:.1%} of the measured matmul rate)" if peak else "") + (" (goal >= 45% compiled)" if comp else ""),
              mfu_plain=mfu(pl), mfu_train=mfu(tr), flops_per_token=fpt)
    pair(None)
    base = rates["plain eager"]
    with fz.using_compile_policy(after_numel=0):   # the steady state: quantizers compiled from the first step
        for name, recipe in RECIPES.items():
            if recipe is None: continue
            r = plain_loop(cfg, recipe, data, warm=S["tput_warm"], device=dev)["tokens_per_s"]
            goal = name == "w8a8g8"
            R.ok(not goal or base / r <= 1.05 or dev.type != "cuda", f"step time {name} / baseline, eager model",
                 f"{base / r:.3f} ({r:,.0f} tokens/s)" + (" (goal <= 1.05 with compiled quantizers)" if goal else ""), tokens_per_s=r)
    pair(S["compile"])   # last: compiling the model takes the longest, and a stopped stage keeps what came before

# ---- 4. int8 ---------------------------------------------------------------------------------------------------
def stage_int8(R: Report, S: dict, dev: torch.device):
    import int8
    policy = dict(after_numel=0) if dev.type == "cuda" else dict(min_numel=2 ** 40)   # CPU: no C++ compiles in --tiny
    with fz.using_compile_policy(**policy):
        rows = int8.measure(str(dev), S["int8_tokens"], S["int8_sizes"], S["reps"], verbose=False)
    for r in rows:
        R.ok(dev.type != "cuda" or (r[3] < 1 and r[6] < 1), f"int8 {r[0]}",
             f"int8 / base: forward {r[3]:.2f}, forward+backward {r[6]:.2f}; fake / base {r[2]:.2f}, {r[5]:.2f}; "
             f"_int_mm / mm {r[7]:.2f}" + (" (goal < 1)" if dev.type == "cuda" else ""), row=r)

# ---- 5. optimizer ----------------------------------------------------------------------------------------------
def stage_optimizer(R: Report, S: dict, dev: torch.device):
    cands = {"AdamW(fused=True)": None, "QAdamW fp32": "fp32", "QAdamW m8v8": "m8-channel_v8-channel",
             "QAdamW m4v4": "m4-channel_v4-channel"}
    opts, mem = {}, {}
    for name, oq in cands.items():
        groups = gpt2_small_params(str(dev), **S["opt"])
        opt = (torch.optim.AdamW(groups, lr=6e-4, fused=True) if oq is None
               else QAdamW(groups, lr=6e-4, optim_quant=None if oq == "fp32" else oq))
        sync(dev); before = torch.cuda.memory_allocated() if dev.type == "cuda" else None
        opt.step(); sync(dev)   # the state is created at the first step
        state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        mem[name] = (torch.cuda.memory_allocated() - before) if dev.type == "cuda" else state
        opts[name] = opt
    res = interleaved({k: o.step for k, o in opts.items()}, reps=11 if dev.type == "cuda" else 3, min_time=0.0, device=str(dev))
    ref_t, ref_m = res["AdamW(fused=True)"][0], mem["AdamW(fused=True)"]
    for name in cands:
        t, ratio = res[name]; m = mem[name] / ref_m
        goal = name == "QAdamW m8v8"
        R.ok(not goal or dev.type != "cuda" or (ratio <= 2 and m <= 0.26), f"optimizer {name}",
             f"{t * 1e3:.2f} ms/step, {ratio:.2f}x fused AdamW; state {mem[name] / 2 ** 20:.1f} MiB "
             f"({'measured memory_allocated' if dev.type == 'cuda' else 'state bytes'}), {m:.3f}x AdamW's"
             + (" (goals <= 2x, <= 0.26x)" if goal else ""), ms=t * 1e3, ratio=ratio, state_bytes=mem[name], state_ratio=m)

# ---- 6. memory and linear time ---------------------------------------------------------------------------------
def stage_memory(R: Report, S: dict, dev: torch.device):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
    for size in S["mem_models"]:
        config = gpt2_config(size, n_positions=max(S["ctx"], 1024) if dev.type == "cuda" else S["ctx"],
                             **({} if dev.type == "cuda" else S["model"]))
        for b in S["mem_batches"]:
            model = _fresh_model(config, Recipe(), dev)
            opt, _ = make_optimizer(model, TrainConfig(), Recipe())
            x = torch.randint(config.vocab_size, (b, S["ctx"]), generator=torch.Generator().manual_seed(0))
            m = profile_step_memory(model, opt, x, amp)
            del model, opt
            if dev.type == "cuda": torch.cuda.empty_cache()
            cats = {k: m[k] for k in MEMORY_CATEGORIES if m.get(k)}
            R.ok(m["peak_bytes"] > 0, f"peak memory {size} batch {b} x {S['ctx']}",
                 f"{m['peak_bytes'] / 2 ** 20:,.0f} MiB at the {m['peak_phase']}: " +
                 ", ".join(f"{k} {v / 2 ** 20:,.0f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])[:4]), **m)

def stage_linear_time(R: Report, S: dict, dev: torch.device):
    for size in S["lin_sizes"]:
        config = gpt2_config(size, **({} if dev.type == "cuda" else S["model"]))
        for t in S["lin_seqs"]:
            r = block_time_share(config, t, S["lin_batch"], 1, 3, dev)
            R.ok(0 < r["share"] < 1, f"linear time share {size} seq {t}",
                 f"{r['share']:.1%} of {r['total_ms']:.2f} ms (kernel time counted once)", **r)

STAGES = {"correctness": stage_correctness, "training": stage_training, "throughput": stage_throughput,
          "int8": stage_int8, "optimizer": stage_optimizer, "memory": stage_memory, "linear_time": stage_linear_time}

def run_stage(name, fn, R, S, dev, tmp, budget):
    "Run one stage under an alarm of `budget` seconds; a failure or an overrun is a FAIL line, and the run goes on."
    def alarm(*_): raise StageTimeout()
    R.stage = name
    old = signal.signal(signal.SIGALRM, alarm); signal.setitimer(signal.ITIMER_REAL, budget)
    t0, status = time.perf_counter(), "done"
    try: fn(R, S, dev, tmp) if name == "throughput" else fn(R, S, dev)
    except StageTimeout:
        status = "overran"; R.add("FAIL", f"stage {name}", f"stopped after its budget of {budget:.0f} s; the checks above are what it finished")
    except Exception as e:
        status = "error"; R.add("FAIL", f"stage {name}", f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)
        gc.collect()
        if dev.type == "cuda": torch.cuda.empty_cache()   # what an aborted stage held
    secs = time.perf_counter() - t0
    R.doc["stages"][name] = dict(status=status, seconds=round(secs, 1), budget=budget)
    print(f"---- stage {name}: {status} in {secs:.1f} s (budget {budget:.0f} s)", flush=True)
    R.save()

def meta(dev: torch.device, tiny: bool) -> dict:
    return dict(tiny=tiny, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_name() or platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
                transformers=__import__("transformers").__version__, python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node())

def results_md(doc: dict) -> str:
    "The `gpu_check:gpu` section of RESULTS.md: the device, the goals with their figures, every check line."
    by = {c["name"]: c for c in doc["checks"]}
    find = lambda prefix: next((c for n, c in by.items() if n.startswith(prefix)), None)
    fig = lambda c: f"{c['status']}: {c['figure']}" if c else "not measured (stage did not finish)"
    int8 = [c for c in doc["checks"] if c["name"].startswith("int8 ")]
    goals = [["baseline MFU, compiled", GOALS["baseline MFU, compiled"], fig(find("MFU baseline compiled"))],
             ["train() / plain loop", GOALS["train() / plain loop"], fig(find("train() / plain loop, baseline eager"))],
             ["w8a8g8 / baseline step", GOALS["w8a8g8 / baseline step"], fig(find("step time w8a8g8 / baseline"))],
             ["int8 / bf16 forward (medium, large)", GOALS["int8 / bf16 forward (medium, large)"],
              "; ".join(f"{c['name'][5:]} {c['row'][3]:.2f}" for c in int8) or "not measured"],
             ["m8v8 / fused AdamW step, state memory", "<= 2x, <= 0.26x", fig(find("optimizer QAdamW m8v8"))]]
    lines = [f"| {c['status']} | {c['name']} | {c['figure'].replace('|', '/')} |" for c in doc["checks"]]
    stages = ", ".join(f"{k} {v['seconds']} s ({v['status']})" for k, v in doc["stages"].items())
    return (f"## gpu_check.py: the CUDA paths and the GPU figures\n\n{doc['device']}; torch {doc['torch']}, CUDA {doc['cuda']}, "
            f"transformers {doc['transformers']}; {doc['date']}. Stages: {stages}.\n\n"
            + markdown_table(["goal", "target", "measured"], goals) + "\n\n| status | check | figure |\n|---|---|---|\n" + "\n".join(lines))

def merged(paths) -> dict:
    "gpu_check.json files of real CUDA runs merged in order: a later run's stages replace the same stages of earlier ones."
    doc = None
    for path in paths:
        d = json.loads(Path(path).read_text())
        if d.get("tiny") or not d.get("cuda") or d.get("device", "").startswith("CPU"):
            raise SystemExit(f"{path} is not from a CUDA run (tiny={d.get('tiny')}, device {d.get('device')!r}): "
                             "RESULTS.md keeps its GPU sections 'not measured'")
        if doc is None: doc = d; continue
        doc["checks"] = [c for c in doc["checks"] if c.get("stage") not in d["stages"]] + d["checks"]
        doc["stages"].update(d["stages"])
        doc.update({k: d[k] for k in ("device", "torch", "cuda", "transformers", "date")})
    return doc

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", help="folder for gpu_check.json")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="write RESULTS.md's GPU section from these gpu_check.json "
                   "files of CUDA runs (a rerun's stages replace the earlier run's) and exit: for results fetched from a GPU machine")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds; what CI runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present; --tiny: cpu)")
    p.add_argument("--only", default=None, help=f"comma-separated stages to run, of {','.join(STAGES)}")
    p.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="another time budget for a stage (a rerun)")
    args = p.parse_args(argv)
    if args.from_json:
        write_section("gpu_check", results_md(merged(args.from_json)), "cuda")
        return None
    if not args.out_dir: p.error("give the folder for gpu_check.json (or --from-json)")
    only = args.only.split(",") if args.only else list(STAGES)
    bad = [s for s in only if s not in STAGES]
    if bad: raise SystemExit(f"--only {args.only!r}: unknown stages {bad}; use some of {list(STAGES)}")
    dev = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"): raise SystemExit(f"--device {args.device!r}: use cuda or cpu")
    if dev.type == "cpu" and not args.tiny: raise SystemExit("the full check needs CUDA; on a CPU run it with --tiny")
    S = dict(TINY if args.tiny else FULL)
    S["budgets"] = dict(S["budgets"])
    for b in args.budget:
        k, _, v = b.partition("=")
        if k not in STAGES or not v.replace(".", "", 1).isdigit(): raise SystemExit(f"--budget {b!r}: write STAGE=SECONDS with a stage of {list(STAGES)}")
        S["budgets"][k] = float(v)
    torch.manual_seed(0)
    if dev.type == "cpu": tune_cpu_allocator(); os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out_dir); out.mkdir(parents=True, exist_ok=True)
    R = Report(out / "gpu_check.json", meta(dev, args.tiny))
    print(f"gpu_check on {R.doc['device']}: torch {R.doc['torch']}, CUDA {R.doc['cuda']}; {'tiny' if args.tiny else 'full'} sizes", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in only: run_stage(name, STAGES[name], R, S, dev, Path(tmp), S["budgets"][name])
    R.doc["seconds"] = round(time.perf_counter() - t0, 1); R.save()
    n = {s: sum(c["status"] == s for c in R.doc["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP in {R.doc['seconds']} s; wrote {R.path}")
    if dev.type == "cuda" and not args.tiny:   # only a real CUDA run fills the GPU section (never --tiny)
        (out / "RESULTS_gpu_check.md").write_text(results_md(R.doc) + "\n")   # travels back with gpu_check.json
        if not args.no_write and only == list(STAGES): write_section("gpu_check", results_md(R.doc), "cuda")
    return R.doc

if __name__ == "__main__": main()
