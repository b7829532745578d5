"""One prepared GPU check: the CUDA paths proven and the GPU figures measured in one run (issues 14 and 21).

    python benchmarks/gpu_check.py OUT_DIR             # on a CUDA machine: every stage, planned for 8 minutes on an H100/H200
    python benchmarks/gpu_check.py OUT_DIR --tiny      # on a CPU in minutes: the same code paths at tiny sizes (CI)
    python benchmarks/gpu_check.py OUT_DIR --dry-run   # anywhere: the full-size settings built, every stage constructed, nothing run
    python benchmarks/gpu_check.py --from-json A.json [B.json]   # RESULTS.md's GPU section from gpu_check.json files of CUDA runs

Stages, in order (each prints `PASS|FAIL|SKIP name: figure` lines and its time against its budget; a stage that
overruns is stopped and says so; `--only` reruns some): correctness (CUDA vs eager vs the CPU reference), training (bf16,
GPT-2 small, the recipes and the fixed second moment), throughput (`train()` and a plain loop, eager; the quantized
recipes), compiled (one compiled `train()` run: MFU), int8 (`benchmarks/int8.py` at medium/large shapes, and what
inductor compiled the int8 product to), optimizer (QAdamW vs fused AdamW: time, stored state and work buffers), memory
(peak memory by category, Figs 2/14/15), linear_time (Fig. 3), ddp (a one-process NCCL group: DDP wrap, an all-reduce,
a step). Writes OUT_DIR/gpu_check.json after every stage; a real CUDA run (never `--tiny`) also writes
OUT_DIR/RESULTS_gpu_check.md and rewrites the `gpu_check:gpu` section of benchmarks/RESULTS.md. Needs only torch,
transformers (+ accelerate, which its Trainer needs), safetensors, numpy and this package: see benchmarks/README.md."""
from __future__ import annotations
import argparse, contextlib, datetime, gc, json, math, os, platform, re, signal, statistics, subprocess, sys, tempfile, time, traceback
from pathlib import Path
from unittest import mock
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch
import torch.nn as nn
from _common import interleaved, markdown_table, write_section, gpt2_small_params
from _loops import plain_loop, run_train, synthetic_datasets
import quantstudy
import quantstudy.quantizers as qz
import quantstudy.fused as fz
import quantstudy.qlinear as ql
import quantstudy.moments as qm
from quantstudy.analysis.linear_time import block_time_share
from quantstudy.analysis.memory import MEMORY_CATEGORIES, _fresh_model, profile_step_memory
from quantstudy.model import Recipe, build_model, gpt2_config
from quantstudy.optim import OptimQuant, QAdamW, make_optimizer
from quantstudy.qlinear import LinearQuant, QuantLinear, int8_matmul, _pad_operands
from quantstudy.host import cpu_name, tune_cpu_allocator
from quantstudy.rundir import write_json
from quantstudy.config import TrainConfig

PEAK_BF16 = 989e12   # H100 SXM dense bf16 FLOP/s (datasheet); the H200 has the same tensor cores and clocks
PLAN_S = 480         # the whole check on one H100/H200, start-up and compiles included: 8 minutes
W8A8 = dict(weight="8-channel", act="8-token")
M4V4_LI = OptimQuant(m="4-block128-dynamic", v="4-rank1-nozero")   # experiments.py's m4v4-li (it imports fastcore: not here)
RECIPES = {"baseline": None, "w8a8": Recipe(linear=LinearQuant(**W8A8)),
           "w8a8g8": Recipe(linear=LinearQuant(**W8A8, grad="8-token")),
           "w8a8g8 int8": Recipe(linear=LinearQuant(**W8A8, grad="8-token", kernel="int8")),
           "m8v8": Recipe(optim=OptimQuant(m="8-channel", v="8-channel")), "m4v4-li": Recipe(optim=M4V4_LI)}
TRAINING_RUNS = ("baseline", "w8a8", "w8a8g8", "m8v8", "m4v4-li")   # m4v4-li: the fixed second moment (Fig. 12b)
TPUT_RECIPES = ("w8a8", "w8a8g8", "w8a8g8 int8", "m8v8")
QADAMW_CHECKS = ("m8-channel_v8-channel", "m4-channel_v4-channel", M4V4_LI.name)
FQ_VARIANTS = {"token": (0, True), "channel": (1, True), "tensor": (None, True), "token asym": (0, False)}
GOALS = {"baseline MFU, compiled": ">= 45%", "train() / plain loop": ">= 0.9x", "w8a8g8 / baseline step": "<= 1.05x",
         "int8 / bf16 forward (medium, large)": "< 1", "m8v8 / fused AdamW step": "<= 2x", "m8v8 / AdamW state memory": "<= 0.26x"}
BF16_TOL = 1e-2      # the same bf16 operands on both sides: only the products' summation order differs (~2e-3 measured on a CPU)
FP32_TOL = 1e-5

# sizes: the real check, and --tiny (a CPU, the same code paths). Budgets: estimates made without a GPU (none has been
# lent yet), each above the need estimated from the work it does; they sum to 450 s so that the run ends inside PLAN_S.
FULL = dict(size="small", model={}, ctx=1024,
            fq={"float32": ("token",), "bfloat16": tuple(FQ_VARIANTS)},   # bf16: the training dtype; fp32: one variant
            tokens=4096, d=768, qadamw=dict(n_layer=1, d=256, vocab=1024, ctx=64),
            train_batch=8, train_steps=50, lr=6e-4, fall=0.5,
            tput_batch=16, tput_steps=30, tput_warm=10, compile="inductor",
            int8_tokens=8192, int8_sizes=("medium", "large"), int8_reps=5,
            opt=dict(), opt_reps=11,
            mem_models=("small",), mem_batches=(1, 8),   # the profiler's own analysis takes seconds a step: the grid is memory()'s
            lin_sizes=("small", "medium", "large", "xl"), lin_seqs=(256, 512, 1024, 2048, 4096), lin_batch=8, lin_repeat=3,
            ddp_batch=8,
            budgets=dict(correctness=70, training=60, throughput=60, compiled=110, int8=35, optimizer=20, memory=35,
                         linear_time=30, ddp=30))
TINY = dict(size="tiny", model=dict(n_layer=2, n_head=2, n_embd=64), ctx=32,
            fq={"float32": ("token",), "bfloat16": ("token",)},   # each variant is a C++ compile (seconds) on a CPU
            tokens=64, d=96, qadamw=dict(n_layer=1, d=64, vocab=512, ctx=64),
            train_batch=4, train_steps=8, lr=3e-3, fall=0.0,
            tput_batch=4, tput_steps=6, tput_warm=2, compile="eager",
            int8_tokens=32, int8_sizes=("small",), int8_reps=2,
            opt=dict(n_layer=1, d=64, vocab=512, ctx=64), opt_reps=3,
            mem_models=("tiny",), mem_batches=(1, 2),
            lin_sizes=("tiny",), lin_seqs=(32, 64), lin_batch=2, lin_repeat=2,
            ddp_batch=2,
            budgets=dict(correctness=240, training=240, throughput=240, compiled=240, int8=240, optimizer=240, memory=240,
                         linear_time=240, ddp=240))

class StageTimeout(BaseException):
    "A stage's budget ran out: a BaseException, so that no `except Exception` (a compile's fallback) takes it for a failure."

class Report:
    "The PASS/FAIL/SKIP lines and every figure, written to gpu_check.json after each stage."
    def __init__(self, path: Path, meta: dict, dry: bool = False, tmp: Path | None = None):
        self.path, self.doc, self.stage, self.dry, self.tmp = path, dict(meta, checks=[], stages={}), None, dry, tmp
        self.int8_code = []   # inductor's output code that holds an int8 product (see `recording_int8_code`)
    def add(self, status: str, name: str, figure: str, **data):
        print(f"{status} {name}: {figure}", flush=True)
        self.doc["checks"].append(dict(status=status, name=name, figure=figure, stage=self.stage, **data))
    def save(self): write_json(self.path, self.doc)
    def ok(self, cond: bool, name: str, figure: str, **data): self.add("PASS" if cond else "FAIL", name, figure, **data)
    def plan(self, figure: str, **data): self.add("PLAN", f"stage {self.stage}", figure, **data)

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "||a - b|| / ||b|| in float64 on the CPU (NaN where either is not finite)."
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()): return math.nan
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()

def amp_ctx(dev, on: bool = True):
    "bf16 autocast on `dev` (CUDA, or a CPU's own for the CPU reference), or nothing."
    return torch.autocast(dev.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

def meta_model(S: dict, recipe=None, size: str | None = None, cfg: TrainConfig | None = None) -> int:
    "Build the model (and, with `cfg`, the optimizer) a stage uses on the meta device: its settings checked, no memory used."
    with torch.device("meta"):
        model = build_model(size or S["size"], recipe, n_positions=S["ctx"], **S["model"])
        if cfg is not None: make_optimizer(model, cfg, recipe)
    return sum(p.numel() for p in model.parameters())

# ---- comparison criteria ---------------------------------------------------------------------------------------
def codes_agree(pairs, max_frac: float = 1e-4) -> tuple[bool, str]:
    "Moment codes (device, CPU): every difference +-1, in at most `max_frac` of the entries (at least 16)."
    # CUDA fuses v's multiply-add (one rounding, not two): a third of the v entries differ by an ulp, and one that sits
    # at a rounding tie flips its code; a real fault (a scale, a rounding mode, an axis) moves many codes, or by more
    n = sum(a.numel() for a, _ in pairs)
    diffs = [(a.cpu().int() - b.cpu().int()).abs() for a, b in pairs]
    flips, worst = sum(int((d != 0).sum()) for d in diffs), max(int(d.max()) for d in diffs)
    allowed = max(16, int(max_frac * n))
    return worst <= 1 and flips <= allowed, f"{flips} of {n} codes differ (allowed {allowed}, each by at most 1: {worst})"

def params_agree(pairs, lr: float, max_frac: float = 1e-4) -> tuple[bool, str]:
    "Parameters (device, CPU) after a few steps: within `lr` everywhere, within 1e-3 lr outside `max_frac` of the entries."
    # a flipped code changes one entry's update by a fraction of lr; elsewhere only float rounding separates the two
    n = sum(a.numel() for a, _ in pairs)
    d = [(a.detach().cpu().double() - b.detach().cpu().double()).abs() for a, b in pairs]
    worst, off = max(float(x.max()) for x in d), sum(int((x > 1e-3 * lr).sum()) for x in d)
    allowed = max(16, int(max_frac * n))
    return (worst <= lr and off <= allowed,
            f"max |param difference| {worst:.1e} (<= lr {lr:g}), {off} of {n} beyond 1e-3 lr (allowed {allowed})")

def bf16_agrees(got, ref, tol: float = BF16_TOL) -> tuple[bool, list[float]]:
    "bf16-autocast results vs the CPU's from the same bf16-rounded operands: each tensor within `tol` (relative norm)."
    errs = [rel(a, b) for a, b in zip(got, ref)]
    return all(e <= tol for e in errs), errs   # NaN fails

# ---- what inductor compiled the int8 product to ----------------------------------------------------------------
@contextlib.contextmanager
def recording_int8_code(sink: list):
    "Inductor's output code of every graph that holds `_int_mm`, appended to `sink` (the graphs the run really compiled)."
    from torch._inductor.graph import GraphLowering
    orig = getattr(GraphLowering, "save_output_code", None)   # a test hook inductor calls with each module's code
    def save(code):
        if "_int_mm" in code: sink.append(code)
        if orig is not None: orig(code)
    with mock.patch.object(GraphLowering, "save_output_code", staticmethod(save)): yield

def describe_int8_code(sources: list[str]) -> str:
    "One line per distinct compiled graph: who runs the int8 product (cuBLAS or a Triton template) and which kernels follow."
    seen = {}
    for src in sources:
        kernels = re.findall(r"^(\w+) = async_compile\.\w+\(", src, re.M)
        extern = "extern_kernels._int_mm" in src
        tem = [k for k in kernels if k.startswith("triton_tem_")]
        rest = [k for k in kernels if k not in tem]
        product = "the extern _int_mm (cuBLAS on CUDA)" if extern else f"a Triton template ({', '.join(tem)})" if tem else "no _int_mm kernel found"
        after = (f", then {len(rest)} kernel(s) {', '.join(rest)}: the rescale runs after the product" if rest
                 else ": the rescale fused into the product" if tem and not extern else ", nothing after it")
        line = f"{product}{after}"
        seen[line] = seen.get(line, 0) + 1
    return "; ".join(f"{line} (x{k})" for line, k in seen.items())

# ---- 1. correctness ----------------------------------------------------------------------------------------------
def missing_inductor_options(options) -> list[str]:
    "The inductor settings among `options` (dotted names) that this torch lacks: torch.compile rejects an unknown one."
    import torch._inductor.config as ic
    missing = []
    for key in options:
        obj = ic
        for part in key.split("."):
            if not hasattr(obj, part): missing.append(key); break
            obj = getattr(obj, part)
    return missing

def quantlinear_run(q, lin0, x0, g0, device, amp: bool) -> list[torch.Tensor]:
    "y, dx, dW, db of `QuantLinear(q)` on `device`, under bf16 autocast if `amp` (which rounds x and W to bf16 first)."
    lin = nn.Linear(lin0.in_features, lin0.out_features, device=device); lin.load_state_dict(lin0.state_dict())
    x = x0.to(device).requires_grad_()
    with amp_ctx(device, amp): y = QuantLinear.from_linear(lin, q)(x)
    y.backward(g0.to(device, y.dtype))
    return [t.float().cpu() for t in (y, x.grad, lin.weight.grad, lin.bias.grad)]

def qadamw_run(oq: str, S: dict, device, seed: int = 0, steps: int = 3, lr: float = 1e-3):
    "QAdamW with `oq` for `steps` steps on GPT-2-shaped parameters with fixed random gradients: (optimizer, parameters)."
    torch.manual_seed(seed)
    groups = gpt2_small_params("cpu", **S["qadamw"])
    groups = [dict(gr, params=[nn.Parameter(p.detach().clone().to(device)) for p in gr["params"]],
                   grads=[p.grad.to(device) for p in gr["params"]]) for gr in groups]
    opt = QAdamW([{k: v for k, v in gr.items() if k != "grads"} for gr in groups], lr=lr, optim_quant=oq)
    for _ in range(steps):
        for gr in groups:
            for p, gp in zip(gr["params"], gr["grads"]): p.grad = gp
        opt.step()
    return opt, [p for gr in groups for p in gr["params"]]

def qadamw_compare(ref, got, lr: float = 1e-3) -> tuple[bool, str]:
    "`codes_agree` and `params_agree` of two `qadamw_run` results."
    (o_ref, p_ref), (o_dev, p_dev) = ref, got
    codes = [(o_dev.moment_codes(b, nm), o_ref.moment_codes(a, nm)) for a, b in zip(p_ref, p_dev) if a.dim() == 2
             for nm in ("exp_avg", "exp_avg_sq")]
    (c_ok, c_fig), (p_ok, p_fig) = codes_agree(codes), params_agree(list(zip(p_dev, p_ref)), lr)
    return c_ok and p_ok, f"{c_fig}; {p_fig}"

def stage_correctness(R: Report, S: dict, dev: torch.device):
    cpu = torch.device("cpu")
    fq = [(getattr(torch, dt), label, *FQ_VARIANTS[label]) for dt, labels in S["fq"].items() for label in labels]
    recipes = {"w8a8": LinearQuant(**W8A8), "w8a8g8": LinearQuant(**W8A8, grad="8-token"),
               "w4a4g4 tensor": LinearQuant(weight="4-tensor", act="4-tensor", grad="4-tensor"),
               "w8a8g8 int8": LinearQuant(**W8A8, grad="8-token", kernel="int8")}
    oqs = [OptimQuant.parse(o) for o in QADAMW_CHECKS]
    missing = missing_inductor_options(fz._INDUCTOR)   # the fused quantizers' exact-division options (notebook 00a)
    R.ok(not missing, "inductor options of the fused quantizers", f"{sorted(fz._INDUCTOR)} in torch {torch.__version__}: "
         + (f"missing {missing}: every fused quantizer falls back to eager" if missing else "all present"))
    if R.dry:
        for o in QADAMW_CHECKS:
            with torch.device("meta"): QAdamW(gpt2_small_params("meta", **S["qadamw"]), optim_quant=o)
        return R.plan(f"{len(fq)} compiled quantizers ({', '.join(f'{l} {str(d)[6:]}' for d, l, *_ in fq)}); QuantLinear "
                      f"{', '.join(recipes)} at {S['tokens']} x {S['d']} -> {2 * S['d']}, fp32 and bf16; _int_mm; QAdamW "
                      f"{', '.join(o.name for o in oqs)}; attention on GPT-2 {S['size']} at {S['ctx']} tokens",
                      parameters=meta_model(S))
    g = torch.Generator().manual_seed(0)
    # (a) the compiled quantizer: bit-identical to eager on the device and to eager on the CPU
    for dtype, label, axis, sym in fq:
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
    # (b) QuantLinear forward/backward on the device vs the CPU, per recipe. fp32: against the CPU's fp32. bf16: against
    # the CPU under its own bf16 autocast, which rounds x and W to bf16 before quantizing as CUDA's does (against fp32,
    # that rounding flips 4-bit codes: 4.9e-2 in y for w4a4g4 on a CPU); the fp32 distance is printed beside it
    d_in, d_out, n = S["d"], 2 * S["d"], S["tokens"]
    x0, g0 = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    lin0 = nn.Linear(d_in, d_out)
    with fz.using_compile_policy(enabled=False):   # the CPU references run eager: no C++ compiles on the way
        refs = {k: (quantlinear_run(q, lin0, x0, g0, cpu, False), quantlinear_run(q, lin0, x0, g0, cpu, True)) for k, q in recipes.items()}
    for name, q in recipes.items():
        ref32, ref16 = refs[name]
        got = quantlinear_run(q, lin0, x0, g0, dev, False)
        errs = [rel(a, b) for a, b in zip(got, ref32)]
        R.ok(all(e <= FP32_TOL for e in errs), f"QuantLinear {name} float32 {dev.type} vs CPU fp32",
             "rel. error y, dx, dW, db = " + ", ".join(f"{e:.1e}" for e in errs) + f" (tolerance {FP32_TOL:.0e})", errors=errs)
        got = quantlinear_run(q, lin0, x0, g0, dev, True)
        ok, errs = bf16_agrees(got, ref16)
        far = [rel(a, b) for a, b in zip(got, ref32)]
        R.ok(ok, f"QuantLinear {name} bfloat16 {dev.type} vs CPU bf16",
             "rel. error y, dx, dW, db = " + ", ".join(f"{e:.1e}" for e in errs) + f" (tolerance {BF16_TOL:.0e}); vs CPU fp32 "
             + ", ".join(f"{e:.1e}" for e in far), errors=errs, errors_vs_fp32=far)
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
    # (d) QAdamW on the device vs the CPU, 3 steps: a few codes may flip by one (see codes_agree), parameters within lr
    for oq in QADAMW_CHECKS:
        with fz.using_compile_policy(enabled=False): ref = qadamw_run(oq, S, cpu)   # eager CPU: no C++ compile
        ok, figure = qadamw_compare(ref, qadamw_run(oq, S, dev))
        R.ok(ok, f"QAdamW {oq} {dev.type} vs CPU, 3 steps", figure)
    # (e) attention: sdpa vs eager; (f) flash-attn vs sdpa where a wheel for this torch imports
    ids = torch.randint(0, 50257, (2, S["ctx"]), generator=g).to(dev)
    models = {}
    def logits(impl, amp):
        if impl not in models: models[impl] = build_model(S["size"], seed=0, attn_implementation=impl, **S["model"]).to(dev).eval()
        with torch.no_grad(), amp_ctx(dev, amp): return models[impl](input_ids=ids).logits.float()
    for amp in (False, True):
        e = rel(logits("sdpa", amp), logits("eager", amp))
        t = 5e-2 if amp else 1e-4   # 12 layers of reordered sums: ~1e-6 in fp32, bf16 rounding (4e-3) compounds
        R.ok(e <= t, f"attention sdpa vs eager {'bf16' if amp else 'fp32'}", f"rel. error of the logits {e:.1e} (<= {t:.0e})")
    try:
        import flash_attn   # noqa: F401
        have_flash, why = dev.type == "cuda", "flash-attn runs on CUDA only"
    except Exception as ex:
        have_flash, why = False, f"flash_attn does not import ({type(ex).__name__}): no wheel for torch {torch.__version__} was carried"
    if have_flash:   # bf16 only: flash-attn has no fp32 kernels
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
    runs = {k: RECIPES[k] for k in TRAINING_RUNS}
    if R.dry:
        n = [meta_model(S, r, cfg=cfg) for r in runs.values()]
        return R.plan(f"{', '.join(runs)} and an fp32 baseline: {cfg.max_steps} steps of GPT-2 {S['size']} ({n[0]:,} "
                      f"parameters), micro batch {cfg.micro_batch_size} x {cfg.block_size}, plain loop")
    data = synthetic_datasets(cfg, (S["train_steps"] + 1) * cfg.batch_size * cfg.block_size)
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
    if dev.type == "cuda":   # bf16 autocast is a CUDA path of train(): on a CPU both runs would be fp32
        r = plain_loop(cfg.replace(precision="fp32"), None, data, device=dev)
        k = max(1, len(r["train_loss"]) // 5)
        a, b = statistics.mean(curves["baseline"][-k:]), statistics.mean(r["train_loss"][-k:])
        R.ok(abs(a - b) <= 0.03 * b, "bf16 baseline vs fp32, same steps", f"mean loss of the last {k} steps {a:.4f} vs "
             f"{b:.4f}: {abs(a - b) / b:.2%} apart (<= 3%)", fp32=r["train_loss"])

# ---- 3. throughput, eager; 4. one compiled train() run ---------------------------------------------------------
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

def tput_cfg(S) -> TrainConfig:
    "The throughput runs: no evaluation inside the timed window (steps warm..max), so both loops time the same work."
    return train_cfg(S, S["tput_steps"], S["tput_batch"], dropout=0.1).replace(log_every=5, eval_blocks=S["tput_batch"],
                                                                               eval_every=S["tput_steps"] + 1)

def stage_throughput(R: Report, S: dict, dev: torch.device):
    cfg = tput_cfg(S)
    fpt = flops_per_token(gpt2_config(S["size"], **S["model"]), S["ctx"])
    if R.dry:
        for k in TPUT_RECIPES: meta_model(S, RECIPES[k], cfg=cfg)
        return R.plan(f"train() and the plain loop, eager, then {', '.join(TPUT_RECIPES)} (plain loop): {cfg.max_steps} steps "
                      f"of {cfg.batch_size} x {cfg.block_size} tokens, timed from step {S['tput_warm']}; {fpt / 1e9:.2f} GFLOP/token")
    data = synthetic_datasets(cfg, (S["tput_steps"] + 1) * cfg.batch_size * cfg.block_size)
    peak = matmul_peak(dev)
    if peak: R.add("PASS", "bf16 matmul 8192^3", f"{peak / 1e12:.0f} TFLOP/s measured (datasheet {PEAK_BF16 / 1e12:.0f})", flops=peak)
    mfu = lambda r: r * fpt / PEAK_BF16
    tr = run_train(cfg, R.tmp / "train-eager", None, data, warm=S["tput_warm"])["tokens_per_s"]
    pl = plain_loop(cfg, None, data, warm=S["tput_warm"], device=dev)["tokens_per_s"]
    # a goal on CUDA only, as the others: tiny CPU steps on a shared machine time its load (trainer_overhead.py is the CPU figure)
    R.ok(tr >= 0.9 * pl or dev.type != "cuda", "train() / plain loop, baseline eager", f"{tr / pl:.3f} ({tr:,.0f} vs {pl:,.0f} tokens/s; goal >= 0.9)",
         train_tokens_per_s=tr, plain_tokens_per_s=pl)
    R.add("PASS", "MFU baseline eager", f"plain loop {mfu(pl):.1%}, train() {mfu(tr):.1%} of {PEAK_BF16 / 1e12:.0f} TFLOP/s"
          + (f" ({pl * fpt / peak:.1%} of the measured matmul rate)" if peak else ""), mfu_plain=mfu(pl), mfu_train=mfu(tr), flops_per_token=fpt)
    with fz.using_compile_policy(after_numel=0):   # the steady state: quantizers compiled from the first step
        for name in TPUT_RECIPES:
            r = plain_loop(cfg, RECIPES[name], data, warm=S["tput_warm"], device=dev)["tokens_per_s"]
            goal = name == "w8a8g8"
            R.ok(not goal or pl / r <= 1.05 or dev.type != "cuda", f"step time {name} / baseline, eager model",
                 f"{pl / r:.3f} ({r:,.0f} tokens/s)" + (" (goal <= 1.05 with compiled quantizers)" if goal else ""), tokens_per_s=r)

def stage_compiled(R: Report, S: dict, dev: torch.device):
    # one compiled run, train() itself: a compiled plain loop beside it would double the longest compile of the check;
    # no evaluation, whose no-grad graph would be one more whole-model compile
    cfg = tput_cfg(S).replace(eval_every=S["tput_steps"])
    fpt = flops_per_token(gpt2_config(S["size"], **S["model"]), S["ctx"])
    if R.dry:
        meta_model(S, None, cfg=cfg)
        return R.plan(f"train() compiled with torch.compile({S['compile']!r}), {cfg.max_steps} steps of {cfg.batch_size} x "
                      f"{cfg.block_size} tokens timed from step {S['tput_warm']}, no evaluation")
    import torch._dynamo.utils as du
    data = synthetic_datasets(cfg, (S["tput_steps"] + 1) * cfg.batch_size * cfg.block_size)
    graphs, t0 = du.counters["stats"]["unique_graphs"], time.perf_counter()
    tr = run_train(cfg, R.tmp / "train-compiled", None, data, warm=S["tput_warm"], compile_backend=S["compile"], evaluate=False)["tokens_per_s"]
    mfu = tr * fpt / PEAK_BF16
    R.add("PASS" if dev.type != "cuda" or mfu >= 0.45 else "FAIL", f"MFU baseline compiled train() ({S['compile']})",
          f"{mfu:.1%} of {PEAK_BF16 / 1e12:.0f} TFLOP/s ({tr:,.0f} tokens/s; goal >= 45%); the run with its compiles "
          f"{time.perf_counter() - t0:.0f} s, {du.counters['stats']['unique_graphs'] - graphs} graphs compiled, "
          f"{sum(du.counters['graph_break'].values())} graph breaks", tokens_per_s=tr, mfu_train=mfu, flops_per_token=fpt)

# ---- 5. int8 ---------------------------------------------------------------------------------------------------
def stage_int8(R: Report, S: dict, dev: torch.device):
    import int8
    shapes = [label for size in S["int8_sizes"] for label in int8.shapes(size)]
    if R.dry: return R.plan(f"{len(shapes)} layers ({', '.join(shapes)}) at {S['int8_tokens']} tokens, {S['int8_reps']} reps")
    policy = dict(after_numel=0) if dev.type == "cuda" else dict(min_numel=2 ** 40)   # CPU: no C++ compiles in --tiny
    with fz.using_compile_policy(**policy):
        rows = int8.measure(str(dev), S["int8_tokens"], S["int8_sizes"], S["int8_reps"], verbose=False)
    for r in rows:
        R.ok(dev.type != "cuda" or (r[3] < 1 and r[6] < 1), f"int8 {r[0]}",
             f"int8 / base: forward {r[3]:.2f}, forward+backward {r[6]:.2f}; fake / base {r[2]:.2f}, {r[5]:.2f}; "
             f"_int_mm / mm {r[7]:.2f}" + (" (goal < 1)" if dev.type == "cuda" else ""), row=r)
    if dev.type != "cuda": R.add("SKIP", "int8 compiled code", "on a CPU the int8 product and its rescale run eager (nothing compiled)")
    elif ql._EPILOGUE.get("broken"): R.add("FAIL", "int8 compiled code", f"the compile failed, eager ops ran: {ql._EPILOGUE['broken']!r}")
    elif R.int8_code: R.add("PASS", "int8 compiled code", describe_int8_code(R.int8_code), graphs=len(R.int8_code))
    else: R.add("SKIP", "int8 compiled code", "no output code recorded (served by inductor's cache, or this torch has no save_output_code hook)")

# ---- 6. optimizer ----------------------------------------------------------------------------------------------
def state_bytes(opt) -> int:
    "Bytes of the optimizer's stored state (moments or their codes and scales, steps), not of its work buffers."
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

def buffer_bytes(opt) -> int:
    "Bytes of QAdamW's fp32 work buffers (the dequantized moments of one chunk), kept between steps; 0 for others."
    return sum(b.nbytes for b in getattr(opt, "_buffers", {}).values())

def stage_optimizer(R: Report, S: dict, dev: torch.device):
    cands = {"AdamW(fused=True)": None, "QAdamW fp32": "fp32", "QAdamW m8v8": "m8-channel_v8-channel",
             "QAdamW m4v4": "m4-channel_v4-channel"}
    if R.dry:
        with torch.device("meta"):
            n = sum(p.numel() for gr in gpt2_small_params("meta", **S["opt"]) for p in gr["params"])
            for oq in cands.values():
                if oq: QAdamW(gpt2_small_params("meta", **S["opt"]), optim_quant=None if oq == "fp32" else oq)
        return R.plan(f"{', '.join(cands)} on {n:,} parameters, {S['opt_reps']} interleaved steps")
    opts, mem = {}, {}
    for name, oq in cands.items():
        groups = gpt2_small_params(str(dev), **S["opt"])
        opt = (torch.optim.AdamW(groups, lr=6e-4, fused=True) if oq is None
               else QAdamW(groups, lr=6e-4, optim_quant=None if oq == "fp32" else oq))
        sync(dev); before = torch.cuda.memory_allocated() if dev.type == "cuda" else None
        opt.step(); sync(dev)   # the state and QAdamW's buffers are created at the first step
        grown = torch.cuda.memory_allocated() - before if dev.type == "cuda" else None
        mem[name], opts[name] = (state_bytes(opt), buffer_bytes(opt), grown), opt
    res = interleaved({k: o.step for k, o in opts.items()}, reps=S["opt_reps"], min_time=0.0, device=str(dev))
    ref_state = mem["AdamW(fused=True)"][0]
    mib = lambda b: f"{b / 2 ** 20:,.1f} MiB"
    for name in cands:
        (t, ratio), (state, bufs, grown) = res[name], mem[name]
        m, goal = state / ref_state, name == "QAdamW m8v8"
        R.ok(not goal or dev.type != "cuda" or (ratio <= 2 and m <= 0.26), f"optimizer {name}",
             f"{t * 1e3:.2f} ms/step, {ratio:.2f}x fused AdamW; stored state {mib(state)}, {m:.3f}x AdamW's; work buffers "
             f"{mib(bufs)}" + (f"; memory_allocated grew {mib(grown)} at the first step" if grown is not None else "")
             + (" (goals <= 2x, <= 0.26x)" if goal else ""), ms=t * 1e3, ratio=ratio, state_bytes=state, buffer_bytes=bufs,
             allocated_bytes=grown, state_ratio=m)

# ---- 7. memory, 8. linear time ---------------------------------------------------------------------------------
def stage_memory(R: Report, S: dict, dev: torch.device):
    configs = {size: gpt2_config(size, n_positions=S["ctx"], **S["model"]) for size in S["mem_models"]}
    if R.dry:
        with torch.device("meta"):
            for c in configs.values(): make_optimizer(_fresh_model(c, Recipe(), "meta"), TrainConfig(), Recipe())
        return R.plan(f"peak memory by category of one step, {', '.join(configs)} at batch {', '.join(map(str, S['mem_batches']))} x {S['ctx']}")
    for size, config in configs.items():
        for b in S["mem_batches"]:
            model = _fresh_model(config, Recipe(), dev)
            opt, _ = make_optimizer(model, TrainConfig(), Recipe())
            x = torch.randint(config.vocab_size, (b, S["ctx"]), generator=torch.Generator().manual_seed(0))
            m = profile_step_memory(model, opt, x, amp_ctx(dev, dev.type == "cuda") if dev.type == "cuda" else None)
            del model, opt
            if dev.type == "cuda": torch.cuda.empty_cache()
            cats = {k: m[k] for k in MEMORY_CATEGORIES if m.get(k)}
            R.ok(m["peak_bytes"] > 0, f"peak memory {size} batch {b} x {S['ctx']}",
                 f"{m['peak_bytes'] / 2 ** 20:,.0f} MiB at the {m['peak_phase']}: " +
                 ", ".join(f"{k} {v / 2 ** 20:,.0f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])[:4]), **m)

def stage_linear_time(R: Report, S: dict, dev: torch.device):
    configs = {size: gpt2_config(size, precision="auto", **S["model"]) for size in S["lin_sizes"]}
    if R.dry:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        with torch.device("meta"):
            for c in configs.values(): GPT2Block(c, layer_idx=0)
        return R.plan(f"one block's forward + backward, {', '.join(configs)} at sequence {', '.join(map(str, S['lin_seqs']))}, "
                      f"batch {S['lin_batch']}, training precision (bf16 autocast on CUDA)")
    for size, config in configs.items():
        for t in S["lin_seqs"]:
            r = block_time_share(config, t, S["lin_batch"], 1, S["lin_repeat"], dev, precision="auto")
            R.ok(0 < r["share"] < 1, f"linear time share {size} seq {t}",
                 f"{r['share']:.1%} of {r['total_ms']:.2f} ms ({r['precision']}, kernel time counted once)", **r)

# ---- 9. one-process NCCL -----------------------------------------------------------------------------------------
def ddp_step(dev: torch.device, S: dict, store: str) -> dict:
    "In a one-process group (NCCL on CUDA, gloo on a CPU): one all-reduce, then one step of a DDP-wrapped GPT-2."
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if dev.type == "cuda": torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.FileStore(store, 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        t = torch.arange(4.0, device=dev); dist.all_reduce(t)   # a sum over one rank: the tensor itself
        cfg = TrainConfig(size=S["size"], model=S["model"], block_size=S["ctx"], batch_size=S["ddp_batch"], micro_batch_size=S["ddp_batch"])
        model = build_model(cfg.size, seed=0, n_positions=cfg.block_size, **cfg.model).to(dev).train()
        ddp = DDP(model, device_ids=[torch.cuda.current_device()] if dev.type == "cuda" else None)
        opt, _ = make_optimizer(model, cfg, None)
        for group in opt.param_groups: group["lr"] = cfg.lr   # the schedule's warm-up starts at 0: this one step must move
        x = torch.randint(0, 1024, (cfg.micro_batch_size, cfg.block_size), generator=torch.Generator().manual_seed(0)).to(dev)
        before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
        with amp_ctx(dev, dev.type == "cuda"): loss = ddp(input_ids=x, labels=x).loss
        loss.backward()   # DDP's reducer all-reduces the gradient buckets here
        opt.step(); sync(dev)
        return dict(backend=dist.get_backend(), all_reduce=t.tolist(), loss=loss.item(),
                    grads_finite=all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None),
                    moved=bool((model.transformer.h[0].attn.c_attn.weight != before).any()),
                    nccl=str(torch.cuda.nccl.version()) if dev.type == "cuda" else None)
    finally: dist.destroy_process_group()

def ddp_main(args: str):
    "The child process of stage ddp: `ddp_step` with the JSON `args`, its result printed as one JSON line."
    a = json.loads(args)
    print("DDP_RESULT " + json.dumps(ddp_step(torch.device(a["device"]), a["S"], a["store"])), flush=True)

def stage_ddp(R: Report, S: dict, dev: torch.device):
    import torch.distributed as dist
    backend = "nccl" if dev.type == "cuda" else "gloo"
    have = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    args = dict(device=str(dev), store=str((R.tmp or Path(tempfile.gettempdir())) / "ddp-store"),
                S={k: S[k] for k in ("size", "model", "ctx", "ddp_batch")})
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu_check; gpu_check.ddp_main({json.dumps(args)!r})"
    if R.dry:
        meta_model(S, None)
        return R.plan(f"a child process: a one-process {backend} group ({'available' if have else 'NOT available in this torch'}), "
                      f"an all-reduce, one DDP step of GPT-2 {S['size']} at {S['ddp_batch']} x {S['ctx']}")
    if not have: return R.add("FAIL", f"ddp one-process {backend}", f"torch.distributed has no {backend} backend here")
    # a child process: a hung or aborted communicator (NCCL's watchdog ends the process) cannot take the check with it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(quantstudy.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    if dev.type == "cpu": env.setdefault("GLOO_SOCKET_IFNAME", "lo")   # gloo binds an interface: loopback needs no network
    t0 = time.perf_counter()
    try: p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=max(5, S["budgets"]["ddp"] - 5))
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return R.add("FAIL", f"ddp one-process {backend}", f"the child did not finish in {e.timeout:.0f} s: " + err[-300:].replace("\n", " | "))
    out = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("DDP_RESULT ")), None)
    if p.returncode or out is None:
        return R.add("FAIL", f"ddp one-process {backend}", f"the child exited {p.returncode}: " + (p.stderr or p.stdout)[-600:].replace("\n", " | "))
    r = json.loads(out.split(" ", 1)[1])
    ok = r["backend"] == backend and r["all_reduce"] == [0.0, 1.0, 2.0, 3.0] and r["grads_finite"] and r["moved"] and math.isfinite(r["loss"])
    R.ok(ok, f"ddp one-process {backend}", f"all-reduce {r['all_reduce']}, DDP step: loss {r['loss']:.3f}, gradients finite: "
         f"{r['grads_finite']}, weights moved: {r['moved']}" + (f", NCCL {r['nccl']}" if r["nccl"] else "")
         + f" ({time.perf_counter() - t0:.0f} s with the child's start)", **r)

STAGES = {"correctness": stage_correctness, "training": stage_training, "throughput": stage_throughput,
          "compiled": stage_compiled, "int8": stage_int8, "optimizer": stage_optimizer, "memory": stage_memory,
          "linear_time": stage_linear_time, "ddp": stage_ddp}

def broken_compiles() -> dict:
    "The library's compiled paths that have fallen back to eager for good, with the exception that made them."
    out = {f"fused quantizer ({d})": e for d, e in fz._broken.items()}
    if ql._EPILOGUE.get("broken"): out["int8 epilogue"] = ql._EPILOGUE["broken"]
    out.update({f"code-table search ({d})": "broken" for d in qm._SEARCH.get("broken", ())})
    return out

def run_stage(name, fn, R, S, dev, budget):
    "Run one stage under an alarm of `budget` seconds; a failure or an overrun is a FAIL line, and the run goes on."
    def alarm(*_): raise StageTimeout()
    R.stage, broken = name, broken_compiles()
    old = signal.signal(signal.SIGALRM, alarm); signal.setitimer(signal.ITIMER_REAL, budget)
    t0, status = time.perf_counter(), "planned" if R.dry else "done"
    try: fn(R, S, dev)
    except StageTimeout:
        status = "overran"; R.add("FAIL", f"stage {name}", f"stopped after its budget of {budget:.0f} s; the checks above are what it finished")
    except Exception as e:
        status = "error"; R.add("FAIL", f"stage {name}", f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)
        gc.collect()
        if dev.type == "cuda" and torch.cuda.is_available(): torch.cuda.empty_cache()   # what an aborted stage held
    for k, e in broken_compiles().items():   # later "compiled" figures would silently be eager ones: say so
        if k not in broken: R.add("FAIL", f"compile fallback {k}", f"fell back to eager ops for the rest of the run: {type(e).__name__ if isinstance(e, BaseException) else e}: {e}")
    secs = time.perf_counter() - t0
    R.doc["stages"][name] = dict(status=status, seconds=round(secs, 1), budget=budget)
    print(f"---- stage {name}: {status} in {secs:.1f} s (budget {budget:.0f} s)", flush=True)
    R.save()

def meta(dev: torch.device, tiny: bool, dry: bool) -> dict:
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    host = f"CPU {cpu_name() or platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return dict(tiny=tiny, dry=dry, device=torch.cuda.get_device_name(dev) if cuda and not dry else (f"dry run on {host}" if dry else host),
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
                transformers=__import__("transformers").__version__, python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node())

def stage_table(doc: dict) -> str:
    "Each stage's seconds against its budget, and the whole run against the plan."
    rows = [[k, v["status"], v["seconds"], v.get("budget", "")] for k, v in doc["stages"].items()]
    total = doc.get("seconds")
    return markdown_table(["stage", "status", "seconds", "budget"], rows) + (f"\n\nwhole run {total} s (the full check on one H100/H200: planned for {PLAN_S} s)" if total else "")

def results_md(doc: dict) -> str:
    "The `gpu_check:gpu` section of RESULTS.md: the device, the goals with their figures, the stage times, every check line."
    by = {c["name"]: c for c in doc["checks"]}
    find = lambda prefix: next((c for n, c in by.items() if n.startswith(prefix)), None)
    fig = lambda c: f"{c['status']}: {c['figure']}" if c else "not measured (stage did not finish)"
    int8 = [c for c in doc["checks"] if c["name"].startswith("int8 ") and "row" in c]
    goals = [["baseline MFU, compiled", GOALS["baseline MFU, compiled"], fig(find("MFU baseline compiled"))],
             ["train() / plain loop", GOALS["train() / plain loop"], fig(find("train() / plain loop, baseline eager"))],
             ["w8a8g8 / baseline step", GOALS["w8a8g8 / baseline step"], fig(find("step time w8a8g8 / baseline"))],
             ["int8 / bf16 forward (medium, large)", GOALS["int8 / bf16 forward (medium, large)"],
              "; ".join(f"{c['name'][5:]} {c['row'][3]:.2f}" for c in int8) or "not measured"],
             ["m8v8 / fused AdamW step, stored state", "<= 2x, <= 0.26x", fig(find("optimizer QAdamW m8v8"))]]
    lines = [f"| {c['status']} | {c['name']} | {c['figure'].replace('|', '/')} |" for c in doc["checks"]]
    return (f"## gpu_check.py: the CUDA paths and the GPU figures\n\n{doc['device']}; torch {doc['torch']}, CUDA {doc['cuda']}, "
            f"transformers {doc['transformers']}; {doc['date']}.\n\n"
            + markdown_table(["goal", "target", "measured"], [[a, b, c.replace("|", "/")] for a, b, c in goals]) + "\n\n"
            + stage_table(doc) + "\n\n| status | check | figure |\n|---|---|---|\n" + "\n".join(lines))

def merged(paths) -> dict:
    "gpu_check.json files of real CUDA runs merged in order: a later run's stages replace the same stages of earlier ones."
    doc = None
    for path in paths:
        d = json.loads(Path(path).read_text())
        if d.get("tiny") or d.get("dry") or not d.get("cuda") or d.get("device", "").startswith(("CPU", "dry run")):
            raise SystemExit(f"{path} is not from a CUDA run (tiny={d.get('tiny')}, dry={d.get('dry')}, device {d.get('device')!r}): "
                             "RESULTS.md keeps its GPU sections 'not measured'")
        if doc is None: doc = d; continue
        doc["checks"] = [c for c in doc["checks"] if c.get("stage") not in d["stages"]] + d["checks"]
        doc["stages"].update(d["stages"])
        doc.update({k: d[k] for k in ("device", "torch", "cuda", "transformers", "date")})
        doc.pop("seconds", None)   # a merged document has no single run time
    return doc

def settings(args) -> dict:
    "TINY or FULL with --budget's changes (checked)."
    S = dict(TINY if args.tiny else FULL)
    S["budgets"] = dict(S["budgets"])
    for b in args.budget:
        k, _, v = b.partition("=")
        if k not in STAGES or not v.replace(".", "", 1).isdigit(): raise SystemExit(f"--budget {b!r}: write STAGE=SECONDS with a stage of {list(STAGES)}")
        S["budgets"][k] = float(v)
    return S

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", help="folder for gpu_check.json")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="write RESULTS.md's GPU section from these gpu_check.json "
                   "files of CUDA runs (a rerun's stages replace the earlier run's) and exit: for results fetched from a GPU machine")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (minutes; what CI runs)")
    p.add_argument("--dry-run", action="store_true", help="build the settings and construct every stage (models on the meta "
                   "device), run and time nothing; needs no GPU")
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
    S = settings(args)
    if args.dry_run: dev = torch.device("cpu" if args.tiny else "cuda")   # the run it plans; nothing is put on it
    else:
        dev = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
        if dev.type not in ("cuda", "cpu"): raise SystemExit(f"--device {args.device!r}: use cuda or cpu")
        if dev.type == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: torch sees no CUDA device")
        if dev.type == "cpu" and not args.tiny: raise SystemExit("the full check needs CUDA; on a CPU run it with --tiny (or --dry-run)")
    torch.manual_seed(0)
    if dev.type == "cpu": tune_cpu_allocator(); os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out_dir); out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        R = Report(out / "gpu_check.json", meta(dev, args.tiny, args.dry_run), dry=args.dry_run, tmp=Path(tmp))
        plan = sum(S["budgets"][s] for s in only)
        print(f"gpu_check on {R.doc['device']}: torch {R.doc['torch']}, CUDA {R.doc['cuda']}; {'tiny' if args.tiny else 'full'} sizes"
              f"{'; dry run' if args.dry_run else ''}; budgets " + ", ".join(f"{s} {S['budgets'][s]:.0f} s" for s in only)
              + f" = {plan:.0f} s (the whole check is planned for {PLAN_S} s)", flush=True)
        t0 = time.perf_counter()
        code = recording_int8_code(R.int8_code) if dev.type == "cuda" and not args.dry_run else contextlib.nullcontext()
        with code:
            for name in only: run_stage(name, STAGES[name], R, S, dev, S["budgets"][name])
    R.doc["seconds"] = round(time.perf_counter() - t0, 1); R.save()
    n = {s: sum(c["status"] == s for c in R.doc["checks"]) for s in ("PASS", "FAIL", "SKIP", "PLAN")}
    print(stage_table(R.doc))
    print(f"gpu_check: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP" + (f", {n['PLAN']} PLAN" if args.dry_run else "")
          + f" in {R.doc['seconds']} s; wrote {R.path}")
    if dev.type == "cuda" and not args.tiny and not args.dry_run:   # only a real CUDA run fills the GPU section
        (out / "RESULTS_gpu_check.md").write_text(results_md(R.doc) + "\n")   # travels back with gpu_check.json
        if not args.no_write and only == list(STAGES): write_section("gpu_check", results_md(R.doc), "cuda")
    return R.doc

if __name__ == "__main__": main()
