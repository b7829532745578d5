"The fused (torch.compile) quantizers give the eager result bit for bit; the policy, fallback, STE and autocast around them."
import warnings
import pytest, torch
import quantstudy.quantizers as qz
import quantstudy.fused as fz
from quantstudy.quantizers import fake_quantize, quantize, qrange
from quantstudy.fused import CompilePolicy, using_compile_policy, compile_policy, set_compile_policy

pytestmark = pytest.mark.numerics   # bit-identities and tolerances: rerun under AVX2 kernels and 2 threads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def eager_fq(x, bits, axis, sym): return qz._fake_quantize_eager(x, bits, axis, sym)
def eager_q(x, bits, axis, sym): return qz._quantize_eager(x, bits, axis, sym)

def fused_fq(x, bits, axis, sym):
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        y = fz.try_fused(x, bits, axis, sym, "fake")
    assert y is not None, "the fused path did not run"
    return y

def fused_q(x, bits, axis, sym):
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        r = fz.try_fused(x, bits, axis, sym, "int8" if bits <= 8 else "int16")
    assert r is not None, "the fused path did not run"
    return r

def half_integers(shape, bits, axis, g, device):
    "A tensor whose every x/s is a half-integer (exactly, or one ulp either side) for its own max-scale s."
    n, p = qrange(bits)
    k = torch.randint(n, p, shape, generator=g).float() + 0.5               # in [n + 0.5, p - 0.5]
    s = 2.0 ** torch.randint(-8, 8, (), generator=g).item() * torch.empty(()).uniform_(1, 2, generator=g).item()
    x = k * s
    x.view(-1)[0] = p * s                                                     # pins max|x| = P s
    if axis is not None:                                                      # every slice gets its max too
        idx = [slice(None)] * x.dim(); idx[1 - axis] = 0; x[tuple(idx)] = p * s
    jitter = torch.randint(-1, 2, shape, generator=g)
    x = torch.where(jitter > 0, x.nextafter(torch.tensor(float("inf"))), torch.where(jitter < 0, x.nextafter(torch.tensor(float("-inf"))), x))
    return x.to(device)

def random_tensors(device, g):
    yield torch.randn(64, 96, generator=g).to(device)
    yield (torch.randn(96, 64, generator=g) * 1e-3).to(device).t()                         # a Conv1D weight's [out, in] view
    yield torch.distributions.StudentT(2.).sample((80, 48)).to(device)                      # heavy tails
    yield (torch.rand(40, 72, generator=g) * 7 - 2).to(device)                              # asymmetric range
    z = torch.randn(32, 48, generator=g); z[3] = 0; z[:, 5] = 0; yield z.to(device)         # zero rows and columns

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_fake_quantize_fused_equals_eager(device, bits):
    g = torch.Generator().manual_seed(bits)
    tensors = list(random_tensors(device, g)) + [half_integers((48, 80), bits, a, g, device) for a in (None, 0, 1)]
    for x in tensors:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            if not torch.isfinite(xd).all(): continue   # 16-bit grids of large scales overflow fp16
            for axis in (None, 0, 1):
                for sym in (True, False):
                    ref, got = eager_fq(xd, bits, axis, sym), fused_fq(xd, bits, axis, sym)
                    assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
                    assert torch.equal(got, ref), (dtype, axis, sym, (got != ref).sum().item())

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8, 12])
def test_quantize_fused_equals_eager(device, bits):
    g = torch.Generator().manual_seed(100 + bits)
    for x in list(random_tensors(device, g)) + [half_integers((48, 80), bits, 0, g, device)]:
        for axis in (None, 0, 1):
            for sym in (True, False):
                (c0, s0, z0), (c1, s1, z1) = eager_q(x, bits, axis, sym), fused_q(x, bits, axis, sym)
                assert c1.dtype == c0.dtype and torch.equal(c1, c0) and c1.stride() == c0.stride()
                assert s1.shape == s0.shape and torch.equal(s1, s0)
                assert (z0 is None and z1 is None) or torch.equal(z1, z0)

def test_the_half_integer_tensors_would_catch_a_reciprocal():
    "x * (1/s) rounds differently from x / s on these inputs, so the equality above is a real check of the division."
    g = torch.Generator().manual_seed(0)
    x = half_integers((48, 80), 8, 0, g, "cpu")
    scale, _ = qz.qparams(x, 8, 0)
    assert (torch.round(x / scale) != torch.round(x * scale.reciprocal())).float().mean() > 0.01

def forced_fq(x, bits, axis, sym):
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        return fake_quantize(x, bits, axis, sym)

def test_nonfinite_inputs_match():
    "A NaN makes its slice's scale 1, so the clamp matters: the CPU kernel flags it and eager ops take over."
    x = torch.randn(16, 24) * 300; x[2, 3] = float("inf"); x[5, 1] = float("nan"); x[7, 7] = -float("inf")
    for axis in (None, 0, 1):
        for sym in (True, False):
            assert torch.equal(forced_fq(x, 8, axis, sym).nan_to_num(7.0), eager_fq(x, 8, axis, sym).nan_to_num(7.0))
    x = torch.randn(16, 24); x[3, 4] = float("inf")   # inf: scale inf, no NaN scale: the fused path runs
    assert torch.equal(fused_fq(x, 8, 0, True).nan_to_num(7.0), eager_fq(x, 8, 0, True).nan_to_num(7.0))

def test_subnormal_scales_fall_back():
    "A subnormal scale is rounded coarsely, |x/s| can exceed P and the clamp matters: flagged, recomputed eagerly."
    x = torch.randn(8, 24)
    x[2] = torch.randn(24) * 1e-39                     # max|x|/P subnormal
    for bits in (8, 16):
        with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
            assert fz.try_fused(x, bits, 0, True, "fake") is None and fz.try_fused(x, bits, 0, True, "int8" if bits <= 8 else "int16") is None
            assert fz.try_fused(x[3:], bits, 0, True, "fake") is not None   # the other rows: fused
        assert torch.equal(forced_fq(x, bits, 0, True), eager_fq(x, bits, 0, True))
        assert torch.equal(forced_fq(x, bits, None, True), eager_fq(x, bits, None, True))

def test_policy_thresholds_and_ski_rental():
    x = torch.randn(64, 64)
    with using_compile_policy(enabled=True, min_numel=4097, after_numel=0):
        assert fz.try_fused(x, 8, 0, True, "fake") is None                          # below min_numel: eager
    key = ("rows", True, "fake", "cpu", torch.float32)
    fz._ready.discard(key); fz._eager_numel.pop(key, None)
    with using_compile_policy(enabled=True, min_numel=0, after_numel=3 * x.numel()):
        assert [fz.try_fused(x, 8, 0, True, "fake") is None for _ in range(4)] == [True, True, True, False]
    with using_compile_policy(enabled=False):
        assert fz.try_fused(x, 8, 0, True, "fake") is None
    assert compile_policy() == CompilePolicy.from_env()                          # restored

def test_env_values():
    assert CompilePolicy.from_env("0") == CompilePolicy(enabled=False) and CompilePolicy.from_env("off").enabled is False
    assert CompilePolicy.from_env("1") == CompilePolicy(after_numel=0) and CompilePolicy.from_env("auto") == CompilePolicy()
    with pytest.raises(ValueError, match="QUANTSTUDY_COMPILE='yes please'"): CompilePolicy.from_env("yes please")
    with pytest.raises(ValueError, match="enabled='1'"): CompilePolicy(enabled="1")

def test_env_var_is_read_at_import(monkeypatch):
    import importlib, subprocess, sys
    out = subprocess.run([sys.executable, "-c", "import quantstudy.fused as f; print(f.compile_policy().enabled)"],
                         env={**__import__("os").environ, "QUANTSTUDY_COMPILE": "0"}, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr

def test_compile_failure_falls_back_to_eager(monkeypatch):
    "No C compiler (or any failure to compile): a warning, eager results, and no further attempts on that device."
    class Broken:
        def __call__(self, *a, **k): raise RuntimeError("no C compiler")
    monkeypatch.setattr(fz, "_kernel", lambda *a: Broken())
    monkeypatch.setattr(fz, "_broken", {})
    x = torch.randn(32, 16)
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        with pytest.warns(UserWarning, match="no C compiler"):
            y = fake_quantize(x, 8, axis=0)
        assert torch.equal(y, eager_fq(x, 8, 0, True)) and "cpu" in fz._broken
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                       # warned once, then silent
            assert torch.equal(fake_quantize(x, 4), eager_fq(x, 4, None, True))

def test_ste_and_autocast_on_the_fused_path():
    x = torch.randn(48, 40, requires_grad=True)
    gy = torch.randn(48, 40)
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        y = fake_quantize(x, 4, axis=0)
        y.backward(gy)
        assert torch.equal(x.grad, gy) and torch.equal(y.detach(), eager_fq(x.detach(), 4, 0, True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xb = x.detach().bfloat16().requires_grad_()
            yb = fake_quantize(xb, 8, axis=1)
            assert yb.dtype == torch.bfloat16 and torch.equal(yb.detach(), eager_fq(xb.detach(), 8, 1, True))
            yb.float().sum().backward()
        assert torch.equal(xb.grad, torch.ones_like(xb))

def test_one_graph_per_kind_for_all_shapes():
    "Dynamic shapes: new shapes and bit widths reuse the compiled graph."
    import torch._dynamo.utils as du
    with using_compile_policy(enabled=True, min_numel=0, after_numel=0):
        fake_quantize(torch.randn(33, 70), 8, axis=0)
        before = du.counters["stats"]["unique_graphs"]
        for shape in ((70, 33), (200, 17), (1024, 96)):
            for bits in (3, 8, 16):
                fake_quantize(torch.randn(shape), bits, axis=0)
        assert du.counters["stats"]["unique_graphs"] == before

def test_compiled_int8_epilogue_matches_eager():
    "The compiled `_int_mm` + rescale (the CUDA route) gives the eager values; run on the CPU here."
    from quantstudy.qlinear import _int_mm_rescaled, _EPILOGUE
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 24), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (24, 16), dtype=torch.int8, generator=g)
    sa, sb, bias = torch.rand(40, 1, generator=g), torch.rand(1, 16, generator=g), torch.randn(16, generator=g)
    for bias_ in (None, bias):
        for dtype in (torch.float32, torch.bfloat16):
            eager = _int_mm_rescaled(a, b, sa, sb, bias_, dtype, compiled=False)
            fused = _int_mm_rescaled(a, b, sa, sb, bias_, dtype, compiled=True)
            assert fused.dtype == dtype and torch.allclose(fused.float(), eager.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6)
    assert "fn" in _EPILOGUE and not _EPILOGUE.get("broken")   # it ran compiled
