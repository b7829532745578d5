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
