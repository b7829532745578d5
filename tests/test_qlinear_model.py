"Quantized linear layers and GPT-2 models: exactness of the no-op patch, the backward of Fig. 1, recipes, checkpoints."
import copy, json, os
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D
from quantstudy.quantizers import QuantSpec
from quantstudy.qlinear import (LinearQuant, QuantLinear, QuantConv1D, quant_linear, quantize_model,
                                quantized_modules, select_modules, linear_modules)
from quantstudy.model import Recipe, gpt2_config, build_model, save_model, load_model, check_recipe
from quantstudy.config import SIZES
from quantstudy.optim import OptimQuant

pytestmark = pytest.mark.numerics   # bit-identities and tolerances: rerun under AVX2 kernels and 2 threads

# ---------------------------------------------------------------- strategies
def specs(role):
    grans = {"weight": ["tensor", "channel"], "act": ["tensor", "channel", "token"], "grad": ["tensor", "channel", "token"]}[role]
    return st.builds(QuantSpec, st.integers(2, 8), st.sampled_from(grans), st.booleans())

@st.composite
def problems(draw):
    "A layer (nn.Linear or Conv1D) with random shapes, an input with 1-3 leading dims and an output gradient."
    seed = draw(st.integers(0, 2**16))
    n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    conv, bias = draw(st.booleans()), draw(st.booleans())
    torch.manual_seed(seed)
    layer = Conv1D(n_out, n_in) if conv else nn.Linear(n_in, n_out, bias=bias)
    if conv: layer.bias.data.normal_()
    x, g = torch.randn(*lead, n_in), torch.randn(*lead, n_out)
    return layer, x, g

def weight_out_in(layer): return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight

def grads_of(fn, layer, x, g):
    "Output and (grad_X, grad_W, grad_b) of fn(x) against the output gradient g."
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters(): p.grad = None
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad

def assert_same(a, b):
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)

# ---------------------------------------------------------------- QuantLinear properties
@settings(max_examples=60, deadline=None)
@given(problems())
def test_noop_is_exactly_the_plain_layer(p):
    layer, x, g = p
    ours = grads_of(QuantLinear.from_linear(layer), layer, x, g)
    ref = grads_of(layer, layer, x, g)
    assert_same(ours, ref)

@settings(max_examples=60, deadline=None)
@given(problems(), specs("weight"), specs("act"))
def test_quantized_backward_is_ste_autograd(p, w_spec, a_spec):
    layer, x, g = p
    q = LinearQuant(weight=w_spec, act=a_spec, backward="quantized")
    def ste(x):  # plain autograd through fake_quantize (identity backward) of the flattened X and of W
        x2 = x.reshape(-1, x.shape[-1])
        return F.linear(a_spec(x2, "act"), w_spec(weight_out_in(layer), "weight"), layer.bias).view(*x.shape[:-1], -1)
    ours = grads_of(QuantLinear.from_linear(layer, q), layer, x, g)
    ref = grads_of(ste, layer, x, g)
    assert torch.equal(ours[0], ref[0])   # the same forward, bit for bit
    # the same gradients up to fp32 summation order: autograd may pick another matmul kernel for degenerate
    # shapes (hypothesis found a 1-feature layer whose input gradient differed in the last bit)
    for u, v in zip(ours[1:], ref[1:]):
        assert (u is None and v is None) or torch.allclose(u, v, rtol=1e-6, atol=1e-7)

@settings(max_examples=60, deadline=None)
@given(problems(), st.one_of(st.none(), specs("weight")), st.one_of(st.none(), specs("act")))
def test_paper_backward_uses_full_precision_operands(p, w_spec, a_spec):
    "backward='paper' without a grad quantizer: the gradients are those of the unquantized layer for the same G."
    layer, x, g = p
    q = LinearQuant(weight=w_spec, act=a_spec)
    ours = grads_of(QuantLinear.from_linear(layer, q), layer, x, g)
    plain = grads_of(layer, layer, x, g)
    for u, v in zip(ours[1:], plain[1:]):
        assert (u is None and v is None) or torch.allclose(u, v, rtol=1e-5, atol=1e-6)
    y = quant_linear(x, weight_out_in(layer), layer.bias, LinearQuant(weight=w_spec, act=a_spec, backward="quantized"))
    assert torch.equal(ours[0], y.detach())  # the forward does not depend on `backward`

@settings(max_examples=60, deadline=None)
@given(problems(), specs("weight"), specs("act"), specs("grad"), st.sampled_from(["paper", "quantized"]))
def test_grad_quantizer_changes_only_grad_w_and_grad_input_only_grad_x(p, w_spec, a_spec, g_spec, backward):
    layer, x, g = p
    run = lambda **kw: grads_of(QuantLinear.from_linear(layer, LinearQuant(w_spec, a_spec, backward=backward, **kw)), layer, x, g)
    base, with_g, with_gin = run(), run(grad=g_spec), run(grad=g_spec, grad_input=True)
    assert_same([base[i] for i in (0, 1, 3)], [with_g[i] for i in (0, 1, 3)])       # y, grad_X, grad_b
    assert_same([with_g[i] for i in (0, 2, 3)], [with_gin[i] for i in (0, 2, 3)])   # y, grad_W, grad_b

def test_grad_quantizer_does_change_the_gradients():
    torch.manual_seed(0)
    layer, x, g = nn.Linear(32, 16), torch.randn(4, 8, 32), torch.randn(4, 8, 16)
    run = lambda q: grads_of(QuantLinear.from_linear(layer, q), layer, x, g)
    base, with_g = run(LinearQuant()), run(LinearQuant(grad="4-token"))
    with_gin = run(LinearQuant(grad="4-token", grad_input=True))
    assert not torch.equal(base[2], with_g[2]) and not torch.equal(with_g[1], with_gin[1])

def test_hand_computed_example():
    W = torch.tensor([[0.75, -1.25, 3.5], [2.0, 0.0, -7.0]], requires_grad=True)
    X = torch.tensor([[7.0, 2.25, -1.0], [0.5, -3.5, 1.0]], requires_grad=True)
    b = torch.tensor([0.5, -1.0], requires_grad=True)
    G = torch.tensor([[0.625, -0.25], [1.75, 0.375]])
    for backward in ("paper", "quantized"):
        W.grad = X.grad = b.grad = None
        Y = quant_linear(X, W, b, LinearQuant("4-channel", "4-token", "4-tensor", backward=backward))
        Y.backward(G)
        assert Y.tolist() == [[2.0, 20.0], [8.0, -7.0]]
        assert b.grad.tolist() == [2.375, 0.125]
    # backward="quantized": grad_W = Ĝᵀ X̂ with X̂ = [[7, 2, -1], [.5, -3.5, 1]], grad_X = G Ŵ with Ŵ = [[1, -1, 3.5], [2, 0, -7]]
    assert W.grad.tolist() == [[4.375, -5.125, 1.25], [-1.5, -2.25, 0.75]]
    assert X.grad.tolist() == [[0.125, -0.625, 3.9375], [2.5, -1.75, 3.5]]

def test_only_needed_tensors_are_saved():
    "Forward saves X or Q_a(X) (never both) plus W or Q_w(W), and nothing for gradients that are not needed."
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    for backward in ("paper", "quantized"):
        q = LinearQuant("8-channel", "8-token", backward=backward)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            QuantLinear.from_linear(lin, q)(x)
        assert len(saved) == 2
        if backward == "paper": assert any(t is lin.weight for t in saved)
        else: assert not any(t is lin.weight for t in saved)
    lin.weight.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        QuantLinear.from_linear(lin, LinearQuant("8-channel", "8-token"))(x)
    assert len(saved) == 1 and saved[0] is lin.weight   # no grad_W needed: X is not kept

def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    lin, x = nn.Linear(32, 16), torch.randn(4, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = lin(x)
        y = QuantLinear.from_linear(lin, LinearQuant()).forward(x)
        yq = QuantLinear.from_linear(lin, LinearQuant("8-channel", "8-token", "8-token")).forward(x)
    assert torch.equal(y, y_ref) and yq.dtype == torch.bfloat16
    yq.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()

# ---------------------------------------------------------------- failures name the bad value
@pytest.mark.parametrize("kw, match", [
    (dict(weight="8-token"), "weight='8-token'"),
    (dict(act="9-rows"), "act='9-rows'"),
    (dict(grad="1-token"), "grad='1-token'"),
    (dict(weight=QuantSpec(8, "token")), "weight=QuantSpec"),
    (dict(backward="int8"), "backward='int8'"),
    (dict(grad="8-token", grad_input=1), "grad_input=1"),
    (dict(grad_input=True), "grad=None"),
])
def test_linear_quant_rejects(kw, match):
    with pytest.raises(ValueError, match=match): LinearQuant(**kw)

def test_linear_quant_roundtrip_and_names():
    q = LinearQuant("4-channel", "4-token-asym", "8-token", grad_input=True, backward="quantized")
    assert LinearQuant.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert q.name == "w4-channel_a4-token-asym_g8-token_gin_bwd-quantized"
    assert LinearQuant(act="8-token").name == "a8-token" and LinearQuant(backward="quantized").name == "fp"
    with pytest.raises(ValueError, match="wieght"): LinearQuant.from_dict({"wieght": "8-channel"})
    with pytest.raises(TypeError): QuantLinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError): QuantLinear(4, 4).quant = "8-channel"

# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))

def step_outputs(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in train mode
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

@pytest.mark.parametrize("train", [False, True])
def test_noop_patched_model_is_exactly_the_model(ids, train):
    ref = build_model("tiny", seed=0).train(train)
    model = copy.deepcopy(ref)
    names = quantize_model(model, LinearQuant())
    assert len(names) == 9 and all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    (l0, g0), (l1, g1) = step_outputs(ref, ids), step_outputs(model, ids)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)

def test_swap_keeps_parameters_tie_and_state_dict():
    model = build_model("tiny", seed=0)
    params = dict(model.named_parameters())
    keys = {k: v.shape for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # created before the swap
    quantize_model(model, LinearQuant("4-channel", "8-token"))
    assert type(model.transformer.h[0].attn.c_attn) is QuantConv1D and type(model.lm_head) is QuantLinear
    assert all(p is params[n] for n, p in model.named_parameters())
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.lm_head.weight.detach().clone()
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    opt.step()  # the optimizer built before the swap updates the quantized model's weights, tie included
    assert not torch.equal(model.lm_head.weight, before) and model.lm_head.weight is model.transformer.wte.weight
    model.tie_weights()  # HF re-tying still works on the wrapped head
    assert model.lm_head.weight is model.transformer.wte.weight

def test_requantize_replaces_the_recipe():
    model = build_model("tiny", seed=0)
    a, b = LinearQuant("8-channel"), LinearQuant(act="8-token")
    quantize_model(model, a)
    quantize_model(model, b)
    assert set(quantized_modules(model).values()) == {b}
    assert not any(isinstance(c, QuantLinear) for m in linear_modules(model).values() for c in m.children())  # no nesting
    assert quantize_model(model, b, ["h.1.mlp.c_fc", "transformer.h.*.attn.c_proj"]) == [
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert quantize_model(model, None) == [] and not quantized_modules(model)
    with pytest.raises(ValueError, match=r"\['mlp.fc1', 'ln_f'\]"): quantize_model(model, a, ["mlp.c_fc", "mlp.fc1", "ln_f"])
    with pytest.raises(ValueError, match="modules=\\[\\]"): select_modules(model, [])

def test_sizes_and_config():
    assert set(SIZES) == {"tiny", "small", "medium", "large", "xl"}
    with torch.device("meta"):
        small = build_model("small", LinearQuant("8-channel"))
    assert sum(p.numel() for p in small.parameters()) == 124_439_808
    c = gpt2_config("medium", n_positions=256, resid_pdrop=0.0)
    assert (c.n_layer, c.n_embd, c.n_positions, c.resid_pdrop, c.attn_pdrop) == (24, 1024, 256, 0.0, 0.1)
    assert c._attn_implementation in ("sdpa", "flash_attention_2")
    with pytest.raises(ValueError, match="'gigantic'"): gpt2_config("gigantic")
    with pytest.raises(ValueError, match="n_embed"): build_model("tiny", n_embed=32)

def test_recipe():
    r = Recipe(linear={"weight": "8-channel", "act": "8-token"}, optim={"m": "8-channel", "v": None}, modules=["attn.c_attn"])
    assert isinstance(r.linear, LinearQuant) and isinstance(r.optim, OptimQuant) and r.modules == ("attn.c_attn",)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.name == "w8-channel_a8-token_only-attn.c_attn_m8-channel"
    assert Recipe(linear=LinearQuant(), optim=OptimQuant()).name == "fp"
    assert Recipe(LinearQuant("4-tensor"), modules="all-linear-no-head").name == "w4-tensor_no-head"
    for bad, match in [(dict(modules="everything"), "modules='everything'"), (dict(modules=[]), "modules=\\[\\]"),
                       (dict(linear="w8"), "linear='w8'"), (dict(optim={"m": "8-token"}), "8-token|token")]:
        with pytest.raises(ValueError, match=match): Recipe(**bad)
    with pytest.raises(ValueError, match="unknown Recipe fields"): Recipe.from_dict({"linaer": None})

def test_save_load_roundtrip(tmp_path, ids):
    recipe = Recipe(LinearQuant("4-channel", "8-token", "8-token"), OptimQuant(m="4-channel"), "all-linear-no-head")
    model = build_model("tiny", recipe, seed=3).eval()
    with torch.no_grad(): logits = model(ids).logits
    path = save_model(model, tmp_path / "ckpt")
    assert {"model.safetensors", "config.json", "recipe.json"} <= set(os.listdir(path))
    loaded = load_model(path)
    assert loaded.recipe == recipe and check_recipe(loaded) == recipe
    assert quantized_modules(loaded) == quantized_modules(model)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad(): assert torch.equal(loaded(ids).logits, logits)
    plain = GPT2LMHeadModel.from_pretrained(path)  # the weights are an ordinary GPT-2 checkpoint
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())
    ptq = load_model(path, recipe=LinearQuant("8-channel"))   # another recipe on the same weights
    assert ptq.recipe == Recipe(LinearQuant("8-channel")) and len(quantized_modules(ptq)) == 9

def test_save_is_atomic(tmp_path, monkeypatch):
    model = build_model("tiny", LinearQuant("8-channel"), seed=0)
    path = save_model(model, tmp_path / "ckpt")
    first = (path / "model.safetensors").read_bytes()
    def boom(*a, **k): raise RuntimeError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"): save_model(build_model("tiny", seed=1), path)
    assert os.listdir(tmp_path) == ["ckpt"] and (path / "model.safetensors").read_bytes() == first
    monkeypatch.undo()
    save_model(build_model("tiny", seed=1), path)   # overwriting replaces the directory, leaving nothing behind
    assert os.listdir(tmp_path) == ["ckpt"] and (path / "model.safetensors").read_bytes() != first
    assert load_model(path).recipe == Recipe()

def test_save_refuses_a_wrong_recipe(tmp_path):
    model = build_model("tiny", seed=0)
    quantize_model(model, LinearQuant("8-channel"))   # quantized by hand, model.recipe still says fp
    with pytest.raises(ValueError, match="does not match"): save_model(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    model.recipe = Recipe(LinearQuant("8-channel"))
    save_model(model, tmp_path / "ckpt")

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_autocast_training_step(ids):
    ids = ids.cuda()
    ref = build_model("tiny", seed=0, attn_implementation="sdpa").cuda()
    model = copy.deepcopy(ref)
    quantize_model(model, LinearQuant())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (l0, g0), (l1, g1) = step_outputs(ref, ids), step_outputs(model, ids)
    assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    quantize_model(model, LinearQuant("8-channel", "8-token", "8-token"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lq, gq = step_outputs(model, ids)
    assert lq.dtype == torch.bfloat16 and all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in gq.values())
    assert ((lq.float() - l0.float()).norm() / l0.float().norm()) < 0.05

def test_quantize_model_takes_a_linear_quant_not_a_recipe():
    "One type per argument: a Recipe is refused, naming what to pass instead."
    model = build_model("tiny", seed=0)
    with pytest.raises(TypeError, match=r"got Recipe \(a Recipe: pass recipe.linear, recipe.modules\)"):
        quantize_model(model, Recipe(linear=LinearQuant()))
