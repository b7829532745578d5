"Issue 21: the bugs of `benchmarks/gpu_check.py` that its first GPU run would have met, each shown on a CPU where a CPU can show it."
import inspect, signal, sys, time, types
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as gc   # noqa: E402
import _loops   # noqa: E402
import quantstudy.fused as fz   # noqa: E402
import quantstudy.qlinear as ql   # noqa: E402
import quantstudy.moments as qm   # noqa: E402

# ---- 1. the full settings ---------------------------------------------------------------------------------------
def test_full_settings_have_every_key_tiny_has():
    "FULL lacked `lin_sizes` (it sat inside a comment): linear_time died with KeyError on the GPU."
    assert set(gc.FULL) == set(gc.TINY)
    assert set(gc.FULL["budgets"]) == set(gc.TINY["budgets"]) == set(gc.STAGES)
    assert gc.FULL["lin_sizes"] == ("small", "medium", "large", "xl")

# ---- 2. a stage's timeout is no compile failure -----------------------------------------------------------------
def _raising(wrapped: bool):
    "A compiled kernel whose call is interrupted by the stage's alarm (wrapped: as a compiler that re-raises it as its own error)."
    def f(*a, **k):
        if not wrapped: raise gc.StageTimeout()
        try: raise gc.StageTimeout()
        except gc.StageTimeout as e: raise RuntimeError("backend compiler failed") from e
    return f

def test_stage_timeout_is_not_an_exception():
    assert issubclass(gc.StageTimeout, BaseException) and not issubclass(gc.StageTimeout, Exception)

@pytest.mark.parametrize("wrapped", [False, True])
def test_fused_quantizer_fallback_lets_a_timeout_through(monkeypatch, wrapped):
    monkeypatch.setattr(fz, "_kernel", lambda *a, **k: _raising(wrapped))
    monkeypatch.setattr(fz, "_broken", {})
    with fz.using_compile_policy(enabled=True, min_numel=0, after_numel=0), pytest.raises(gc.StageTimeout):
        fz.try_fused(torch.randn(8, 8), 8, 0, True, "fake")
    assert fz._broken == {}   # compiling is not marked broken: later compiled figures stay compiled

@pytest.mark.parametrize("wrapped", [False, True])
def test_int8_epilogue_fallback_lets_a_timeout_through(monkeypatch, wrapped):
    monkeypatch.setattr(ql, "_EPILOGUE", {"fn": _raising(wrapped)})
    a, b = torch.ones(4, 8, dtype=torch.int8), torch.ones(8, 4, dtype=torch.int8)
    with pytest.raises(gc.StageTimeout): ql._int_mm_rescaled(a, b, torch.ones(4, 1), torch.ones(1, 4), None, torch.float32, compiled=True)
    assert "broken" not in ql._EPILOGUE

def test_code_table_search_fallback_lets_a_timeout_through(monkeypatch):
    monkeypatch.setattr(qm, "_SEARCH", {"fn": _raising(True)})
    with fz.using_compile_policy(enabled=True, min_numel=0), pytest.raises(gc.StageTimeout):
        qm._nearest(torch.rand(64), torch.linspace(0, 1, 16))
    assert "broken" not in qm._SEARCH

def test_a_stage_stopped_inside_a_compile_overruns_and_breaks_nothing(monkeypatch, tmp_path):
    "The alarm lands while a kernel compiles (here: sleeps): the stage is 'overran', not done with eager figures."
    def slow(*a, **k):
        def f(*args): time.sleep(30)
        return f
    monkeypatch.setattr(fz, "_kernel", slow)
    monkeypatch.setattr(fz, "_broken", {})
    def stage(R, S, dev):
        with fz.using_compile_policy(enabled=True, min_numel=0, after_numel=0): fz.try_fused(torch.randn(8, 8), 8, 0, True, "fake")
        R.add("PASS", "after the compile", "should not be reached")
    R = gc.Report(tmp_path / "g.json", {})
    gc.run_stage("s", stage, R, gc.TINY, torch.device("cpu"), 0.3)
    assert R.doc["stages"]["s"]["status"] == "overran" and fz._broken == {}
    assert [c["name"] for c in R.doc["checks"]] == ["stage s"]   # no "compile fallback" line either

# ---- 3. QAdamW: CUDA vs CPU --------------------------------------------------------------------------------------
def test_codes_agree_allows_a_few_flips_by_one():
    ref = torch.randint(-127, 128, (1000, 100), dtype=torch.int8)
    few = ref.clone(); few.view(-1)[[3, 500, 77777]] += torch.tensor([1, -1, 1], dtype=torch.int8)
    assert gc.codes_agree([(few, ref)])[0] and gc.codes_agree([(ref, ref)])[0]
    assert not gc.codes_agree([(ref.clamp(max=126) + 1, ref.clamp(max=126))])[0]   # systematic: every code +1
    two = ref.clone(); i = int((ref.view(-1) < 100).nonzero()[0]); two.view(-1)[i] += 2
    assert not gc.codes_agree([(two, ref)])[0]   # one code off by 2: no rounding tie does that
    many = ref.clone(); many.view(-1)[::50] ^= 1   # 2% of the codes flipped by one
    assert not gc.codes_agree([(many, ref)])[0]
    u = torch.randint(0, 16, (64, 64), dtype=torch.uint8)   # a MomentScheme's unsigned indices
    assert gc.codes_agree([(u, u)])[0] and not gc.codes_agree([(u // 2, u)])[0]

def test_params_agree_bounds_differences_by_lr():
    lr, ref = 1e-3, torch.randn(1000, 100) * 0.02
    few = ref.clone(); few.view(-1)[[1, 2, 3]] += 0.5 * lr   # three flipped codes move three updates
    assert gc.params_agree([(few, ref)], lr)[0] and gc.params_agree([(ref + 1e-8, ref)], lr)[0]   # rounding
    one = ref.clone(); one.view(-1)[7] += 2 * lr
    assert not gc.params_agree([(one, ref)], lr)[0]
    assert not gc.params_agree([(ref + 0.01 * lr, ref)], lr)[0]   # systematic: every entry 1e-2 lr off (a wrong bias correction)

def _fused_addcmul(selfs, t1, t2, value=1):
    "`_foreach_addcmul_` as CUDA computes it: the multiply-add rounded once (float64 then fp32), not twice."
    for s, a, b in zip(selfs, t1, t2): s.copy_((s.double() + value * a.double() * b.double()).float())

def test_qadamw_criterion_accepts_cuda_rounding_that_the_old_one_failed(monkeypatch):
    "CPU QAdamW against itself with CUDA's fused multiply-add emulated: codes flip in some seeds (the old check's FAIL), the new criterion passes."
    S, flipped = gc.FULL, 0
    for seed in range(3):
        ref = gc.qadamw_run("m8-channel_v8-channel", S, torch.device("cpu"), seed=seed)
        with monkeypatch.context() as m:
            m.setattr(torch, "_foreach_addcmul_", _fused_addcmul)
            got = gc.qadamw_run("m8-channel_v8-channel", S, torch.device("cpu"), seed=seed)
        (o1, p1), (o2, p2) = ref, got
        codes = sum(int((o1.moment_codes(a, nm) != o2.moment_codes(b, nm)).sum()) for a, b in zip(p1, p2) if a.dim() == 2
                    for nm in ("exp_avg", "exp_avg_sq"))
        dp = max((a - b).abs().max().item() for a, b in zip(p1, p2))
        flipped += not (codes == 0 and dp <= 1e-6)   # the old criterion
        ok, figure = gc.qadamw_compare(ref, got)
        assert ok, (seed, figure)
    assert flipped >= 1

# ---- 4. bf16 QuantLinear ----------------------------------------------------------------------------------------
def test_bf16_agrees_on_rounding_not_on_a_fault():
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(512, 256, generator=g).bfloat16().float() for _ in range(4)]
    resummed = [(r.double() * (1 + 2 ** -9 * torch.randn(r.shape, generator=g).double())).bfloat16().float() for r in ref]
    assert gc.bf16_agrees(resummed, ref)[0]   # another summation order: about one bf16 rounding apart
    assert not gc.bf16_agrees([r * 1.02 for r in ref], ref)[0]   # a 2% scale error
    step = [r.clone() for r in ref]; step[0].view(-1)[::5] += ref[0].abs().max() / 7   # 4-bit code steps in 20% of y
    assert not gc.bf16_agrees(step, ref)[0]
    assert not gc.bf16_agrees([ref[0] * float("nan")] + ref[1:], ref)[0]

def test_bf16_w4a4g4_is_compared_with_bf16_rounded_operands():
    "Against the fp32 reference a correct bf16 run of w4a4g4 misses 3e-2 (bf16 rounding flips 4-bit codes); against the CPU's bf16 path it agrees."
    S, cpu = gc.FULL, torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    d_in, n = S["d"], S["tokens"]
    x0, g0, lin0 = torch.randn(n, d_in, generator=g), torch.randn(n, 2 * d_in, generator=g), torch.nn.Linear(d_in, 2 * d_in)
    q = ql.LinearQuant(weight="4-tensor", act="4-tensor", grad="4-tensor")
    with fz.using_compile_policy(enabled=False):
        ref32, ref16 = gc.quantlinear_run(q, lin0, x0, g0, cpu, False), gc.quantlinear_run(q, lin0, x0, g0, cpu, True)
        again = gc.quantlinear_run(q, lin0, x0, g0, cpu, True)
    far = [gc.rel(a, b) for a, b in zip(ref16, ref32)]
    assert max(far) > 3e-2   # the old check's FAIL on a correct implementation
    assert gc.bf16_agrees(again, ref16)[0]

# ---- 5. optimizer memory: stored state and work buffers apart --------------------------------------------------
def test_qadamw_state_and_buffers_reported_apart():
    groups = gc.gpt2_small_params("cpu", n_layer=1, d=64, vocab=512, ctx=64)
    opt = gc.QAdamW(groups, lr=1e-3, optim_quant="m8-channel_v8-channel"); opt.step()
    assert gc.state_bytes(opt) == opt.state_bytes() > 0
    assert gc.buffer_bytes(opt) == sum(b.nbytes for b in opt._buffers.values()) > 0   # fp32 work buffers, kept between steps
    adamw = torch.optim.AdamW(gc.gpt2_small_params("cpu", n_layer=1, d=64, vocab=512, ctx=64)); adamw.step()
    assert gc.buffer_bytes(adamw) == 0

# ---- 6. train() and the plain loop timed alike -------------------------------------------------------------------
def test_train_is_timed_with_the_plain_loops_two_syncs(monkeypatch):
    "StepClock synced after every timed step (7 here), the plain loop twice: on CUDA that drains train()'s launch queue only."
    syncs = []
    monkeypatch.setattr(_loops, "_sync", lambda device: syncs.append(device))
    def fake_train(cfg, out_dir, recipe, resume, callbacks):
        args, state = types.SimpleNamespace(device="cuda"), types.SimpleNamespace(global_step=0)
        for s in range(1, cfg.max_steps + 1):
            state.global_step = s
            for c in callbacks: c.on_step_end(args, state, None)
        return dict(curves=dict(train=[], val=[]))
    monkeypatch.setattr(_loops.qt, "train", fake_train)
    cfg = types.SimpleNamespace(max_steps=8, batch_size=2, block_size=4)
    r = _loops.run_train(cfg, "unused", warm=2)
    assert len(syncs) == 2 and r["tokens_per_s"] > 0

def test_throughput_window_holds_no_evaluation():
    "Train() evaluates after its last stamp, the plain loop before it: so no evaluation may fall inside the window."
    for S in (gc.FULL, gc.TINY):
        cfg = gc.tput_cfg(S)
        assert all(s % cfg.eval_every for s in range(S["tput_warm"] + 1, cfg.max_steps + 1))

# ---- 7. the int8 path: what it compiles to ---------------------------------------------------------------------
CUBLAS = '''
triton_poi_fused__to_copy_add_mul_0 = async_compile.triton('triton_poi_fused__to_copy_add_mul_0', \'\'\'
...\'\'\')
def call(args):
    extern_kernels._int_mm(arg0_1, arg1_1, out=buf0)
    triton_poi_fused__to_copy_add_mul_0.run(buf0, arg2_1, arg3_1, buf1)
'''
TEMPLATE = '''
triton_tem_fused__int_mm__to_copy_add_mul_0 = async_compile.triton('triton_tem_fused__int_mm__to_copy_add_mul_0', \'\'\'
...torch.ops.aten._int_mm...\'\'\')
def call(args):
    triton_tem_fused__int_mm__to_copy_add_mul_0.run(arg0_1, arg1_1, arg2_1, buf0)
'''

def test_describe_int8_code():
    cublas = gc.describe_int8_code([CUBLAS, CUBLAS])
    assert cublas.startswith("the extern _int_mm (cuBLAS on CUDA)") and "triton_poi_fused__to_copy_add_mul_0" in cublas and "after" in cublas and "(x2)" in cublas
    fused = gc.describe_int8_code([TEMPLATE])
    assert "Triton template (triton_tem_fused__int_mm__to_copy_add_mul_0)" in fused and "fused into the product" in fused
    assert gc.describe_int8_code([]) == ""

def test_int8_compile_claims_nothing_torch_ignores():
    "`force_fuse_int_mm_with_mul` is read by no code of torch 2.11-2.13: the library no longer passes it nor claims one kernel."
    src = inspect.getsource(ql)
    assert "force_fuse_int_mm_with_mul" not in src and "compiled into one kernel" not in src

def test_recording_int8_code_sees_a_real_compile(tmp_path, monkeypatch):
    "The hook the GPU run reads the int8 code through, on a real inductor compile (CPU: C++)."
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))   # a cold cache, as on a bare GPU machine
    def f(a, b, sa): return (torch._int_mm(a, b).float() * sa).to(torch.bfloat16)
    a, b = torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    sink = []
    with gc.recording_int8_code(sink): torch.compile(f)(a, b, torch.rand(32, 1))
    assert sink and "extern_kernels._int_mm" in sink[0]
    assert gc.describe_int8_code(sink).startswith("the extern _int_mm")

# ---- 8. flash-attn only in 16 bits; Fig. 3 at training precision -----------------------------------------------
def test_flash_attention_only_for_bf16_or_fp16(monkeypatch):
    from quantstudy import model as qmodel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert qmodel.default_attn_implementation() == "sdpa"   # precision unknown: flash-attn would fail an fp32 run
    assert qmodel.default_attn_implementation("fp32") == qmodel.default_attn_implementation(torch.float32) == "sdpa"
    for p in ("bf16", "fp16", "auto", torch.bfloat16): assert qmodel.default_attn_implementation(p) == "flash_attention_2"
    assert qmodel.gpt2_config("tiny", precision="fp32")._attn_implementation == "sdpa"

def test_linear_time_says_its_precision():
    from quantstudy.analysis.linear_time import block_time_share
    from quantstudy.model import gpt2_config
    r = block_time_share(gpt2_config("tiny"), 16, 1, 1, 1, "cpu")
    assert r["precision"] == "fp32" and 0 < r["share"] < 1   # a CPU trains in fp32; CUDA profiles under bf16 autocast

# ---- 9. the fixed second moment and one NCCL process ------------------------------------------------------------
def test_m4v4_li_is_the_experiments_recipe():
    from quantstudy.experiments import get_experiment
    assert gc.RECIPES["m4v4-li"] == get_experiment("m4v4-li").recipe
    assert "m4v4-li" in gc.TRAINING_RUNS and gc.M4V4_LI.name in gc.QADAMW_CHECKS

# ---- 10. budgets --------------------------------------------------------------------------------------------------
def test_full_budgets_fit_the_plan():
    "Every stage stopped at its budget still ends the check inside 8 minutes, with 30 s for start-up and the JSON."
    assert sum(gc.FULL["budgets"].values()) <= gc.PLAN_S - 30 and gc.PLAN_S <= 480
    assert list(gc.FULL["budgets"]) == list(gc.STAGES)
