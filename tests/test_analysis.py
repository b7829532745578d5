"Analyses of the paper's figures: the data they return on tiny models and a tiny trained run, and their failure cases."
import json, os, shutil
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest, torch
from quantstudy.analysis import ANALYSES, FIGURE_FILES, run_analysis
from quantstudy.analysis.runs import checkpoint_dir, eval_batches, load_run_model, resolve_layer
from quantstudy.analysis.memory import memory
from quantstudy.analysis.linear_time import linear_time
from quantstudy.analysis.sharpness import filter_normalized_direction, loss_surface, m_sharpness, _params
from quantstudy.analysis.activations import ActivationCallback, activations, layer_stats, outliers
from quantstudy.analysis.gradients import gradient_error, gradient_histogram, with_grad_quant, _grads
from quantstudy.analysis.second_moment import second_moment
from quantstudy.model import Recipe, build_model
from quantstudy.optim import OptimQuant, QAdamW
from quantstudy.qlinear import LinearQuant, quantized_modules
from quantstudy.optim import make_optimizer
from quantstudy.train import train
from quantstudy.config import TrainConfig

pytestmark = pytest.mark.numerics   # thresholds on sharpness, gradient errors and zero bins: rerun on AVX2
MINI = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=1000)   # profiled in milliseconds

def batches(n=2, b=4, t=32, vocab=50257, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (b, t), generator=g) for _ in range(n)]

# memory (Figs 2, 14, 15)

def test_memory_split_is_exact_for_parameters_and_optimizer_state():
    fp = memory(models={"mini": MINI}, batch_sizes=(1, 4), seq_len=16, seq_lens=(16,), batch_size=4)   # two steps profiled
    q = memory(models={"mini": MINI}, batch_sizes=(4,), seq_len=16, seq_lens=(), recipe=Recipe(optim=OptimQuant(m="8-channel", v="8-channel", embeddings=True)))   # the mini model is mostly its embedding
    json.dumps(fp, allow_nan=False)
    model = build_model("tiny", **MINI)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # the tied embedding once
    for r in fp["rows"] + q["rows"]:
        assert r["parameters"] == r["accounting"]["parameters"] == n_bytes
        assert r["optimizer_state"] == r["accounting"]["optimizer_state"]
        assert r["peak_bytes"] == sum(r[c] for c in ("parameters", "optimizer_state", "gradients", "activations",
                                                      "autograd_detail", "inputs", "temporary", "unknown"))
        assert r["peak_phase"] in ("forward", "backward", "optimizer")
    # fp32 AdamW: two moments the size of the parameters, plus the step counters
    assert n_bytes * 2 <= fp["rows"][0]["optimizer_state"] <= n_bytes * 2 + 8 * len(list(model.parameters()))
    # 8-bit moments of the matrices: about a quarter, the real saving of QAdamW
    assert q["rows"][0]["optimizer_state"] < 0.3 * fp["rows"][0]["optimizer_state"]
    b1, b4 = fp["rows"][0], fp["rows"][1]
    assert b4["accounting"]["saved_activations"] > 3 * b1["accounting"]["saved_activations"]   # activations grow with the batch
    assert [(r["sweep"], r["batch_size"], r["seq_len"]) for r in fp["rows"]] == [("batch", 1, 16), ("batch", 4, 16), ("seq", 4, 16)]
    assert fp["rows"][2]["peak_bytes"] == fp["rows"][1]["peak_bytes"]   # one measurement shared by both sweeps

def test_memory_of_a_quantized_model_keeps_parameter_bytes():
    r = memory(models={"mini": MINI}, batch_sizes=(2,), seq_len=16, seq_lens=(), recipe=Recipe(linear=LinearQuant(weight="4-channel")))["rows"][0]
    assert r["recipe"] == "w4-channel" and r["parameters"] == r["accounting"]["parameters"]

# linear time (Fig. 3)

def test_linear_time_share_is_a_fraction_per_size_and_length():
    threads = torch.get_num_threads()
    d = linear_time(sizes={"mini": build_model("tiny", **MINI).config}, seq_lens=(16, 64), repeat=1)
    assert [(r["model"], r["seq_len"]) for r in d["rows"]] == [("mini", 16), ("mini", 64)]
    assert all(0 < r["share"] < 1 and r["linear_ms"] < r["total_ms"] for r in d["rows"])
    assert torch.get_num_threads() == threads and d["threads"] == 1   # single-threaded while timing, restored after

# sharpness (Fig. 5)

def test_m_sharpness_is_first_order_for_small_radii_and_restores_the_weights(tiny_model):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    xs = batches(1)
    d = m_sharpness(model, xs, rhos=(1e-3, 1e-2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert d["m"] == 4 and d["sharpness"][1] > d["sharpness"][0] > 0
    assert abs(d["sharpness"][0] / 1e-3 - d["grad_norm"]) < 0.05 * d["grad_norm"]   # S(rho) ~ rho |g|
    s = loss_surface(model, xs[:1], steps=3, span=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad(): center = model.eval()(input_ids=xs[0], labels=xs[0]).loss.item()
    assert s["alphas"] == [-0.5, 0.0, 0.5] and abs(s["loss"][1][1] - center) < 1e-5

def test_filter_normalized_directions(tiny_model):
    model = tiny_model()
    d1 = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    d2 = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))   # seeded: runs share directions
    for (name, p), d in zip(_params(model), d1):
        if p.dim() == 1: assert (d == 0).all(), name
        elif "wte" in name or "wpe" in name: assert torch.allclose(d.norm(dim=1), p.norm(dim=1), rtol=1e-4), name
        else: assert torch.allclose(d.norm(dim=0), p.norm(dim=0), rtol=1e-4), name   # HF Conv1D: filters are columns

# gradients (Fig. 10)

def test_gradient_quantization_copies_keep_the_recipe_and_leave_the_model(tiny_model):
    model = tiny_model(LinearQuant(weight="8-channel"))
    q = with_grad_quant(model, "8-token", grad_input=True)
    assert set(quantized_modules(model).values()) == {LinearQuant(weight="8-channel")}
    assert set(quantized_modules(q).values()) == {LinearQuant(weight="8-channel", grad="8-token", grad_input=True)}
    assert q.transformer.wte.weight is q.lm_head.weight   # still tied
    x = batches(1)[0]
    la, ga = _grads(model, x)
    lb, gb = _grads(with_grad_quant(model, None), x)
    assert la == lb and all(torch.equal(ga[k], gb[k]) for k in ga)

def test_gradient_error_orders_bits_and_backward_paths(tiny_model):
    model = tiny_model()
    e = gradient_error(model, batches(1), ("8-token", "4-token"))
    e16 = gradient_error(model, batches(1), "16-token", modules="all-linear-no-head")["16-token"]
    assert e16["weight_only"]["relative"] < 1e-4 and e16["with_input"]["relative"] < 1e-3   # 16 bits: nearly exact
    # the LM head's output gradient (softmax - onehot) is where quantization bites: it sets the overall error
    assert gradient_error(model, batches(1), "16-token")["16-token"]["weight_only"]["relative"] > 10 * e16["weight_only"]["relative"]
    for s in ("8-token", "4-token"):
        assert e[s]["with_input"]["l2"] > e[s]["weight_only"]["l2"] > 0
    assert all(a > b for a, b in zip(e["4-token"]["weight_only"]["per_block"], e["8-token"]["weight_only"]["per_block"]))

def test_gradient_histogram_fractions():
    g = torch.tensor([[1.0, 0.001, 0.5, 0.0], [2.0, -2.0, 1e-6, 0.01]])
    h = gradient_histogram(g, "8-token", bins=10, rel=1e-3)
    # 8-bit per token, scales 1/127 and 2/127: 0.001, 0 and 1e-6 round to 0; 0.5 -> 64 and 0.01 -> 1 do not
    assert h["exact_zero_fraction"] == 1 / 8 and h["quantized_zero_fraction"] == 3 / 8
    assert h["near_zero_fraction"] == 3 / 8   # |g| < 0.002: 0.001, 0, 1e-6
    assert sum(h["counts"]) == 7 and len(h["log10_edges"]) == 11

# activations and outliers (Figs 6, 8)

def test_outliers_find_a_planted_massive_channel(tiny_model):
    model = tiny_model()
    with torch.no_grad(): model.transformer.h[-1].mlp.c_fc.bias[7] = 50.0   # GELU passes it: channel 7 of FC2's input
    d = outliers(model, batches=batches(1))
    assert d["layer"] == "transformer.h.1.mlp.c_proj" and d["top_channels"][0] == 7
    assert d["absmax_over_std"] > 8 and d["beyond_sigma_fraction"] > 0 and sum(d["counts"]) == d["numel"] == 4 * 32 * 128

def test_layer_names(tiny_model):
    model = tiny_model(n_layer=4)
    assert resolve_layer(model, "middle-attn-proj") == "transformer.h.2.attn.c_proj"
    assert resolve_layer(model, "last-fc2") == "transformer.h.3.mlp.c_proj"
    assert resolve_layer(model, "transformer.h.0.mlp.c_fc") == "transformer.h.0.mlp.c_fc"
    with pytest.raises(ValueError, match="layer='h.0.mlp'"): resolve_layer(model, "h.0.mlp")
    with pytest.raises(ValueError, match="steps=0"): ActivationCallback(batches(1)[0], steps=0)

# second moment (Fig. 12)

def test_second_moment_of_a_live_optimizer(tiny_model):
    def run(optim_quant):
        model = tiny_model()
        opt = QAdamW(model.parameters(), lr=1e-3, optim_quant=optim_quant)
        with pytest.raises(ValueError, match="take a step first"): second_moment(model, optimizer=opt)
        for x in batches(3):
            model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return second_moment(model, optimizer=opt, spec="8-tensor")
    fp, q = run(None), run(OptimQuant(v="8-tensor"))
    json.dumps(q, allow_nan=False)
    assert fp["stored"] == "fp32" and q["stored"] == "quantized" and q["spec"] == "8-tensor" and fp["step"] == q["step"] == 3
    # fp32 v: no exact zero in the linear layers; only the last position's row of wpe (no target after it) is 0
    assert all(v["exact_zero_fraction"] == 0 for k, v in fp["per_param"].items() if "wpe" not in k)
    assert fp["zero_fraction"] <= 32 / fp["numel"] + 1e-12
    assert q["zero_fraction"] > 0.5 and fp["quantized_zero_fraction"] > 0.5   # 8-bit per tensor: most of v in the zero bin
    assert sum(q["counts"]) == q["numel"] and q["codes"][0] == -128 and q["counts"][q["codes"].index(-1)] == 0
    with pytest.raises(ValueError, match="run directory"): second_moment(tiny_model())

# a tiny trained run: callback, checkpoints, registry

@pytest.fixture(scope="module")
def tiny_cfg(tiny_config):
    return lambda **kw: tiny_config(**{**dict(micro_batch_size=8, max_steps=8, eval_every=4, eval_blocks=4), **kw})

@pytest.fixture(scope="module")
def trained(tiny_cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    # quantized m trains (Fig. 11); a quantized v, 8-bit per channel or per tensor, diverges within 4 steps here (Fig. 12)
    cfg, recipe = tiny_cfg(), Recipe(optim=OptimQuant(m="8-channel"))
    probe = eval_batches(cfg, 1, 4)[0]
    cb = ActivationCallback(probe, steps=4, path=tmp / "with" / "activations.json")
    train(cfg, tmp / "with", recipe, callbacks=[cb])
    train(cfg, tmp / "without", recipe)
    return tmp, cb

def test_callback_records_without_changing_training(trained):
    tmp, cb = trained
    a, b = load_run_model(tmp / "with"), load_run_model(tmp / "without")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))   # the probe forward changes nothing
    rec = activations(tmp / "with")
    assert rec["steps"] == [0, 4, 8] and rec["layer"] == "transformer.h.1.attn.c_proj" and rec == json.loads(json.dumps(cb.data))
    ck = activations(tmp / "with", recorded=False)     # the same layer measured on checkpoints 4 and 8
    assert ck["steps"] == [4, 8] and ck["snapshots"][-1]["channel_absmax"] == rec["snapshots"][-1]["channel_absmax"]
    assert activations(tmp / "without")["steps"] == [4, 8]   # no recording: checkpoints
    assert layer_stats(a, "middle-attn-proj", eval_batches(tmp / "with", 1, 4)[0])["channel_absmax"] == rec["snapshots"][-1]["channel_absmax"]

def test_second_moment_from_a_checkpoint(tiny_cfg, trained):
    tmp, _ = trained
    d = second_moment(tmp / "with", checkpoint="last", spec="8-tensor")
    assert d["stored"] == "fp32" and d["spec"] == "8-tensor" and d["step"] == 8 and d["quantized_zero_fraction"] > 0.5
    assert all(v["exact_zero_fraction"] == 0 for k, v in d["per_param"].items() if "wpe" not in k)
    assert second_moment(tmp / "with", checkpoint="first")["step"] == 4
    with pytest.raises(ValueError, match="checkpoint=5"): checkpoint_dir(tmp / "with", 5)
    # a checkpoint whose optimizer.pt holds 8-bit v codes reads back exactly what the live optimizer holds
    cfg, model = tiny_cfg(), load_run_model(tmp / "with", checkpoint=8)
    opt, _ = make_optimizer(model, cfg, Recipe(optim=OptimQuant(v="8-tensor")))
    for x in eval_batches(cfg, 2, 4):
        model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    live = second_moment(model, optimizer=opt)
    fake = tmp / "v8"
    shutil.copytree(tmp / "with", fake)
    torch.save(opt.state_dict(), fake / "checkpoint-8" / "optimizer.pt")
    saved = second_moment(fake, checkpoint=8)
    assert live["stored"] == saved["stored"] == "quantized" and live["spec"] == saved["spec"] == "8-tensor"
    assert live["counts"] == saved["counts"] and live["per_param"] == saved["per_param"] and live["quantized_zero_fraction"] > 0.5   # embeddings: fp32 v, read as 8-tensor codes

def test_every_registered_analysis_runs_and_draws(trained):
    tmp, _ = trained
    run = tmp / "with"
    kw = dict(memory=dict(batch_sizes=(1,), seq_len=16, seq_lens=()), linear_time=dict(seq_lens=(16,), repeat=1),
              sharpness=dict(n_batches=1, batch_size=2, steps=3, rhos=(0.1,)), gradients=dict(batch_size=2, specs=("8-token",)))
    assert set(ANALYSES) == set(FIGURE_FILES) == {"memory", "linear_time", "sharpness", "activations", "outliers", "gradients", "second_moment"}
    for name in ANALYSES:
        data, fig = run_analysis(name, run, out_dir=tmp / "figs", close=True, **kw.get(name, {}))
        json.dumps(data, allow_nan=False)
        assert data["analysis"] == name and Path(data["figure_file"]).is_file()
        assert fig.get_suptitle().startswith("Figure")
    plt.close("all")
    with pytest.raises(ValueError, match="unknown analysis"): run_analysis("sharpnes", run)
