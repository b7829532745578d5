"The INT8 path of `LinearQuant(kernel='int8')`: the products on int8 codes equal the fake-quantized ones up to fp32 rounding."
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D
from quantstudy.quantizers import fake_quantize, quantize, QuantSpec
from quantstudy.qlinear import LinearQuant, QuantLinear, int8_matmul, quant_linear, quantize_model

pytestmark = pytest.mark.numerics   # bit-identities and tolerances: rerun under AVX2 kernels and 2 threads

EPS = 2.0 ** -24

def as_int8(q: LinearQuant) -> LinearQuant:
    return LinearQuant(q.weight, q.act, q.grad, q.grad_input, q.backward, kernel="int8")

def run(layer, quant, x, g):
    "Output and gradients (X, W, b) of `layer` wrapped with `quant`."
    x = x.detach().requires_grad_()
    layer.weight.grad = layer.bias.grad = None
    y = QuantLinear.from_linear(layer, quant)(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()

def matmul_bound(a, b, k):
    "Rounding bound of a float matmul of `a` [m, k] and `b` [k, n] (each of its k additions rounds) plus the rescale."
    return (k + 4) * EPS * (a.abs() @ b.abs())

def w_out_in(layer): return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()

def layers(d_in=40, d_out=24, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(d_in, d_out), Conv1D(d_out, d_in)]

RECIPES = {   # name -> (LinearQuant, the products that run on int8 codes)
    "paper w8-channel a8-token g8-token": (LinearQuant(weight="8-channel", act="8-token", grad="8-token"), ("forward",)),
    "w4-channel a8-tensor": (LinearQuant(weight="4-channel", act="8-tensor"), ("forward",)),
    "quantized bwd, gin, W per tensor": (LinearQuant(weight="8-tensor", act="8-token", grad="8-token", grad_input=True,
                                                     backward="quantized"), ("forward", "grad_input")),
    "quantized bwd, G per channel, X per tensor": (LinearQuant(weight="8-channel", act="8-tensor", grad="8-channel",
                                                               backward="quantized"), ("forward", "grad_weight")),
    "all three in int8": (LinearQuant(weight="8-tensor", act="8-tensor", grad="8-tensor", grad_input=True,
                                      backward="quantized"), ("forward", "grad_input", "grad_weight")),
}

@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_int8_equals_fake_up_to_fp32_rounding(name, layout):
    fake, products = RECIPES[name]
    q = as_int8(fake)
    assert q.int8_matmuls == products
    layer = layers()[layout == "conv1d"]
    torch.manual_seed(1)
    x, g = torch.randn(3, 12, 40), torch.randn(3, 12, 24)
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = run(layer, fake, x, g), run(layer, q, x, g)
    x2, g2, w = x.view(-1, 40), g.view(-1, 24), w_out_in(layer).detach()
    qx, qw = fake.act(x2, "act"), fake.weight(w, "weight")
    assert ((y1 - y0).view(-1, 24).abs() <= matmul_bound(qx, qw.t(), 40) + 1e-6).all()
    assert not torch.equal(y1, F.linear(x, w, layer.bias))
    # each backward product: identical to the fake path when in high precision, within fp32 rounding when in int8
    gq = fake.grad(g2, "grad") if fake.grad is not None else g2
    if "grad_input" in products:
        assert ((gx1 - gx0).view(-1, 40).abs() <= matmul_bound(gq, qw, 24)).all()
    else: assert torch.equal(gx1, gx0)
    xb = qx if fake.backward == "quantized" else x2
    if "grad_weight" in products:
        gw_out_in = gw1 if layout == "linear" else gw1.t()
        gw_ref = gw0 if layout == "linear" else gw0.t()
        assert ((gw_out_in - gw_ref).abs() <= matmul_bound(gq.t(), xb, 36)).all()
    else: assert torch.equal(gw1, gw0)
    assert torch.equal(gb1, gb0) and gw1.shape == layer.weight.shape

def test_int8_against_float64():
    "The int8 forward is exact up to the rescale: a few ulps from the float64 product of the dequantized codes."
    torch.manual_seed(2)
    x, w, b = torch.randn(70, 96) * 3, torch.randn(50, 96) * 0.02, torch.randn(50)
    cx, sx, _ = quantize(x, 8, 0)
    cw, sw, _ = quantize(w, 8, 0)
    ref = (cx.double() * sx.double()) @ (cw.double() * sw.double()).t() + b.double()
    y = quant_linear(x, w, b, LinearQuant(weight="8-channel", act="8-token", kernel="int8"))
    assert ((y.double() - ref).abs() <= 4 * EPS * ((cx.double() * sx.double()).abs() @ (cw.double() * sw.double()).abs().t() + b.abs().double())).all()

@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 13, 7), (16, 8, 8), (17, 24, 40), (33, 100, 50)])
def test_padding_for_cublas_is_exact(m, k, n):
    "The zero padding cuBLAS needs (m > 16; k, n multiples of 8; B column-major) changes nothing: forced on the CPU."
    torch.manual_seed(m + k + n)
    ca, sa, _ = quantize(torch.randn(m, k), 8, 0)
    cb, sb, _ = quantize(torch.randn(n, k), 8, 0)
    bias = torch.randn(n)
    plain = int8_matmul(ca, cb.t(), sa, sb.view(1, -1), bias, pad=False)
    padded = int8_matmul(ca, cb.t(), sa, sb.view(1, -1), bias, pad=True)
    assert padded.shape == (m, n) and torch.equal(plain, padded)
    per_tensor = int8_matmul(ca, cb.t(), sa.amax().view(1, 1), sb.amax().view(1, 1), pad=True)
    assert per_tensor.shape == (m, n)

@pytest.mark.parametrize("pad", [False, True])
def test_long_sums_do_not_overflow(pad):
    "More than 131064 terms could overflow one int32 sum: slices are summed in int64, still exact."
    k = 270_001
    a = torch.full((2, k), 127, dtype=torch.int8); b = torch.full((k, 3), -127, dtype=torch.int8)
    a[1, ::2] = -127
    one = torch.ones(1, 1)
    y = int8_matmul(a, b, one, one, pad=pad)
    exact = torch.tensor([-127.0 * 127 * k, 127.0 * 127]).view(2, 1).expand(2, 3)
    assert torch.equal(y, exact.float())

def test_bf16_autocast():
    "Under autocast both paths run in bf16; int8 keeps exact codes and fp32 scales where fake rounds X̂, Ŵ to bf16."
    torch.manual_seed(3)
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 20, 64, requires_grad=True)
    outs = {}
    for kernel in ("fake", "int8"):
        q = LinearQuant(weight="8-channel", act="8-token", grad="8-token", kernel=kernel)
        layer = QuantLinear.from_linear(lin, q)
        lin.weight.grad = x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
        assert y.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        outs[kernel] = (y.detach().float(), lin.weight.grad.clone(), x.grad.clone())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(outs["int8"][0], outs["fake"][0]) < 1e-2
    assert torch.equal(outs["int8"][1], outs["fake"][1]) and torch.equal(outs["int8"][2], outs["fake"][2])

@pytest.mark.parametrize("kw,match", [
    (dict(weight="8-channel", act="8-channel"), "act='8-channel' puts a scale on each input feature"),
    (dict(weight="8-channel"), "act=None is not quantized"),
    (dict(act="8-token"), "weight=None is not quantized"),
    (dict(weight="8-channel-asym", act="8-token"), "asymmetric"),
    (dict(weight="12-channel", act="8-token"), "12-bit codes"),
])
def test_recipes_whose_forward_scales_do_not_factor_raise(kw, match):
    with pytest.raises(ValueError, match=match): LinearQuant(**kw, kernel="int8")
    LinearQuant(**kw)   # fine for the fake kernel

def test_the_paper_weight_gradient_runs_in_high_precision():
    "Per-token G scales lie on the summed axis of Ĝᵀ X: the weight gradient is a float matmul (documented, SwitchBack)."
    q = LinearQuant(weight="8-channel", act="8-tensor", grad="8-token", backward="quantized", kernel="int8")
    assert q.int8_matmuls == ("forward",)
    q = LinearQuant(weight="8-channel", act="8-token", grad="8-channel", backward="quantized", kernel="int8")
    assert q.int8_matmuls == ("forward",)   # X per token: its scales lie on the summed axis too

def test_serialisation_and_name():
    q = LinearQuant(weight="8-channel", act="8-token", kernel="int8")
    assert q.name == "w8-channel_a8-token_int8" and q.to_dict()["kernel"] == "int8"
    assert LinearQuant.from_dict(q.to_dict()) == q
    assert LinearQuant.from_dict({k: v for k, v in q.to_dict().items() if k != "kernel"}).kernel == "fake"
    with pytest.raises(ValueError, match="kernel='int4'"): LinearQuant(kernel="int4")

def test_tiny_gpt2_trains_with_int8():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 512, (2, 32))
    out = {}
    for kernel in ("fake", "int8"):
        model = GPT2LMHeadModel(cfg).eval(); model.load_state_dict(ref.state_dict())   # eval: no dropout
        quantize_model(model, LinearQuant(weight="8-channel", act="8-token", grad="8-token", kernel=kernel))
        loss = model(ids, labels=ids).loss
        loss.backward()
        out[kernel] = (loss.item(), model.lm_head.weight.grad.clone())
    assert abs(out["int8"][0] - out["fake"][0]) < 1e-4
    assert torch.allclose(out["int8"][1], out["fake"][1], rtol=1e-3, atol=1e-6)
