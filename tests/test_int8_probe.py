"The once-per-process probe of `torch._int_mm` on a CPU (notebook 01): warns once, with the ratio, when int8 is slower."
import warnings
import pytest, torch
import quantstudy.qlinear as ql
from quantstudy.qlinear import LinearQuant, QuantLinear

INT8 = LinearQuant(weight="8-channel", act="8-token", grad="8-token", kernel="int8")

def _forward_twice():
    "Two int8 forward+backward passes on the CPU; the warnings they raise."
    layer = QuantLinear(32, 24, quant=INT8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            layer(torch.randn(4, 32, requires_grad=True)).sum().backward()
    return [w for w in seen if "_int_mm" in str(w.message)]

@pytest.fixture
def fresh_probe(monkeypatch):
    "A process state in which the probe has not run yet (restored afterwards)."
    monkeypatch.setattr(ql, "_INT_MM_RATIO", {})
    monkeypatch.setattr(ql, "_INT_MM_EXACT", {"cpu": True})   # the speed probe alone: exactness has its own tests below
    return monkeypatch

def test_slow_int_mm_warns_once_with_ratio(fresh_probe):
    calls = []
    fresh_probe.setattr(ql, "_time_int_mm", lambda: calls.append(1) or 31.0)   # an AVX2 CPU's measured ratio
    got = _forward_twice()
    assert len(calls) == 1 and len(got) == 1 and "31.0x" in str(got[0].message)
    assert ql.int_mm_cpu_ratio() == 31.0 and len(calls) == 1   # cached: never measured again

def test_fast_int_mm_is_silent(fresh_probe):
    fresh_probe.setattr(ql, "_time_int_mm", lambda: 0.11)   # oneDNN with AVX512-VNNI
    assert _forward_twice() == [] and ql.int_mm_cpu_ratio() == 0.11

def test_fake_kernel_never_probes(fresh_probe):
    fresh_probe.setattr(ql, "_time_int_mm", lambda: pytest.fail("probed without kernel='int8'"))
    QuantLinear(32, 24, quant=LinearQuant(weight="8-channel", act="8-token"))(torch.randn(4, 32)).sum()
    assert ql._INT_MM_RATIO == {}

def test_probe_leaves_global_rng_alone():
    "Training's random stream must not depend on whether (or when) the probe ran."
    torch.manual_seed(0); a = torch.rand(3)
    torch.manual_seed(0); r = ql._time_int_mm(m=32, k=64, n=32, reps=1); b = torch.rand(3)
    assert r > 0 and torch.equal(a, b)

def test_inexact_int_mm_falls_back_to_an_exact_product(monkeypatch):
    "Where oneDNN's _int_mm saturates (no VNNI), the codes are multiplied in float64: the int8 layer stays exact."
    monkeypatch.setattr(ql, "_INT_MM_EXACT", {})
    wrong = lambda a, b: (a.long() @ b.long()).clamp(-2**15, 2**15 - 1).to(torch.int32)   # an int16-saturating kernel
    monkeypatch.setattr(torch, "_int_mm", wrong)
    with pytest.warns(UserWarning, match="wrong int8 products"): assert not ql.int_mm_is_exact()
    (a, b), (x, y) = ql._int_mm_probe_operands()
    assert torch.equal(ql.int_mm(a, b).long(), a.long() @ b.long()) and torch.equal(ql.int_mm(x, y).long(), x.long() @ y.long())
    with warnings.catch_warnings():
        warnings.simplefilter("error"); ql.int_mm_is_exact()   # warned once

def test_this_cpus_int_mm_path_is_exact():
    "Whatever kernel this CPU's oneDNN picks (rerun under ONEDNN_MAX_CPU_ISA=AVX2 by the numerics pass), int_mm is exact."
    (a, b), (x, y) = ql._int_mm_probe_operands()
    for p, q in ((a, b), (x, y), (a[:, :16].contiguous(), b[:16].contiguous())):
        assert torch.equal(ql.int_mm(p, q).long(), p.long() @ q.long())
