"Property tests of the quantizers: eq. (1) holds for any shape, bit width, granularity and dtype."
import pytest, torch
from hypothesis import given, settings, strategies as st
from quantstudy.quantizers import QuantSpec, fake_quantize, quantize, dequantize, qparams, qrange

pytestmark = pytest.mark.numerics   # bit-identities and tolerances: rerun under AVX2 kernels and 2 threads

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))

@st.composite
def tensors(draw):
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if draw(st.booleans()): x[0] = 0  # an all-zero row
    return x

@settings(max_examples=200, deadline=None)
@given(tensors(), st.integers(2, 16), st.sampled_from([None, 0, 1, -1]), st.booleans())
def test_grid_idempotent_error(x, bits, axis, symmetric):
    n, p = qrange(bits)
    q = fake_quantize(x, bits, axis, symmetric)
    assert q.shape == x.shape and q.dtype == x.dtype and torch.isfinite(q).all()
    codes, s, z = quantize(x, bits, axis, symmetric)
    assert codes.min() >= n and codes.max() <= p
    assert torch.equal(dequantize(codes, s, z), q)                       # fake = dequantize(quantize)
    assert torch.equal(fake_quantize(q, bits, axis, symmetric), q) or not symmetric  # a projection
    tol = s / 2 + 4 * torch.finfo().eps * x.abs()
    assert ((q - x).abs() <= tol).all()                                  # round to nearest, nothing clipped

@settings(max_examples=50, deadline=None)
@given(tensors(), st.sampled_from([4, 8]))
def test_zero_rows_stay_zero(x, bits):
    x[0] = 0
    assert (fake_quantize(x, bits, axis=0)[0] == 0).all()

def test_ties_to_even():
    # scale 1 (max 7 at 4 bits): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 7.0])
    assert fake_quantize(x, 4).tolist() == [0.0, 2.0, 2.0, -2.0, 7.0]

def test_ste_gradient_is_identity():
    x = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    fake_quantize(x, 3, axis=1).backward(g)
    assert torch.equal(x.grad, g)

@pytest.mark.parametrize("bits", [0, 1, 17, 8.0, "8", True])
def test_bad_bits_name_the_value(bits):
    with pytest.raises(ValueError, match=f"bits={bits!r}"):
        fake_quantize(torch.ones(2), bits)
    with pytest.raises(ValueError, match="from 2 to 16"):
        QuantSpec(bits)

def test_bad_axis_and_dtype():
    with pytest.raises(ValueError, match="axis=2"):
        fake_quantize(torch.ones(2, 2), 8, axis=2)
    with pytest.raises(TypeError, match="float"):
        fake_quantize(torch.ones(2, dtype=torch.int32), 8)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(16, 32).to(dtype)
    q = fake_quantize(x, 8, axis=0)
    assert q.dtype == dtype
    ref = fake_quantize(x.float(), 8, axis=0).to(dtype)   # scale and rounding happen in fp32
    assert torch.equal(q, ref)
