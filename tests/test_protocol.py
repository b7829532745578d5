"""The paper's protocol as the authors measured it (issue 11): perplexity texts, per-window scales, corpora and splits,
scale floors, which moments are quantized, full-length runs, gradient placements, the analyses and the report."""
import copy, json, math, os
from pathlib import Path
import numpy as np, pytest, torch

DATA = Path(os.environ.get("QUANTSTUDY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
os.environ.setdefault("QUANTSTUDY_DATA", str(DATA))
from quantstudy.data import CORPORA, hub_rows, load_corpus, load_tokenizer, tokenize_corpus

needs_data = pytest.mark.skipif(not (DATA / "ptb").is_dir(), reason=f"no data root at {DATA}")

@pytest.fixture(autouse=True)
def data_env(monkeypatch):
    "Every test sees the data root in $QUANTSTUDY_DATA."
    monkeypatch.setenv("QUANTSTUDY_DATA", str(DATA))

@pytest.fixture(scope="module")
def tok(): return load_tokenizer(DATA)

# item 1: the tokenized WikiText sets, rows joined with "\n\n"
@needs_data
def test_wikitext_columns_are_the_tokenized_sets_and_differ(tok, tmp_path):
    wt2, wt103 = (tokenize_corpus(n, "test", tok, DATA, tmp_path, join="\n\n") for n in ("wikitext2", "wikitext103"))
    assert "<unk>" in tok.decode(wt2[:200])                                  # wiki.test.tokens, not the raw text
    assert len(wt2) != len(wt103) and not np.array_equal(wt2[:2000], wt103[:2000])   # the two columns are not one text
    raw = tokenize_corpus("wikitext2-raw", "test", tok, DATA, tmp_path, join="\n\n")   # raw stays available by name
    assert "<unk>" not in tok.decode(raw[:2000])

@needs_data
def test_perplexity_text_is_the_hub_rows_joined(tok, tmp_path):
    lines = (DATA / "wikitext-2/wiki.test.tokens").read_text(encoding="utf-8").split("\n")
    rows = [l + "\n" if l.strip() else "" for l in lines[:-1]]               # the hub's rows: blank lines empty
    assert hub_rows("wikitext2", load_corpus("wikitext2", "test")["text"]) == rows
    ids = tokenize_corpus("wikitext2", "test", tok, DATA, tmp_path, join="\n\n", max_tokens=3000)
    assert ids.tolist() == tok.backend_tokenizer.encode("\n\n".join(rows)).ids[:3000]
    lm1b = hub_rows("lm1b", load_corpus("lm1b", "test", limit=3)["text"])
    assert all(not r.endswith("\n") for r in lm1b)                          # 1BW and PTB rows: bare sentences

@needs_data
def test_perplexity_defaults_to_the_joined_text(tok):
    from quantstudy.model import build_model
    from quantstudy.evaluate.perplexity import perplexity
    m = build_model("tiny", seed=0).eval()
    r = perplexity(m, "ptb", max_tokens=512, progress=False)
    joined = tokenize_corpus("ptb", "test", tok, DATA, join="\n\n", max_tokens=512)
    assert r.join == "\n\n" and r.ppl == pytest.approx(perplexity(m, joined.astype(np.int64), progress=False).ppl, rel=1e-6)

# item 3: per-tensor activation scales per scored window
@needs_data
@pytest.mark.parametrize("act", ["4-tensor", "4-channel"])
def test_per_tensor_perplexity_does_not_depend_on_the_batch(tok, act):
    from quantstudy.model import Recipe, build_model
    from quantstudy.qlinear import LinearQuant
    from quantstudy.evaluate.perplexity import perplexity
    m = build_model("tiny", Recipe(linear=LinearQuant(act=act)), seed=0).eval()
    ids = torch.from_numpy(tokenize_corpus("ptb", "test", tok, DATA, max_tokens=1024).astype(np.int64))
    one, eight = (perplexity(m, ids, batch_size=b, progress=False) for b in (1, 8))
    assert math.isfinite(one.ppl) and one.ppl == eight.ppl and eight.batch_size == 1

# items 10, 11: the OpenWebText sample is its own corpus; the full one needs its files; split options
@needs_data
def test_openwebtext_never_falls_back_to_the_sample():
    with pytest.raises(FileNotFoundError) as e: load_corpus("openwebtext", "train", DATA)
    assert "openwebtext/openwebtext.jsonl" in str(e.value)
    assert CORPORA["openwebtext-sample"].hub is None and len(load_corpus("openwebtext-sample", "validation")) == 11

@needs_data
def test_paper_preset_fails_before_training_without_the_full_corpus(tmp_path):
    from quantstudy.train import datasets_for
    from quantstudy.config import preset
    with pytest.raises(FileNotFoundError, match="openwebtext.jsonl"): datasets_for(preset("paper"))

@needs_data
def test_heldout_fraction_and_seed_are_options(tok, tmp_path):
    n = sum(len(load_corpus("openwebtext-sample", s)) for s in ("train", "validation"))
    assert len(load_corpus("openwebtext-sample", "validation", heldout=0.0005)) == math.ceil(0.0005 * n)
    a, b = (list(load_corpus("openwebtext-sample", "validation", seed=s)["text"]) for s in (2345, 1))
    assert a != b and a == list(load_corpus("openwebtext-sample", "validation")["text"])   # 2345: the authors' seed
    with pytest.raises(ValueError, match="heldout"): load_corpus("ptb", "test", heldout=0.1)
    x, y = (tokenize_corpus("openwebtext-sample", "validation", tok, DATA, tmp_path, seed=s) for s in (2345, 1))
    assert not np.array_equal(x[:100], y[:100])                             # the cache key holds the seed

# item 4: every cell of report.PAPER against the paper's text, Table 11's 8-bit per-column row included
PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "000_91d3a43653df32f3.txt"

def _paper_tables(text: str) -> dict[int, list[list]]:
    "The number rows of each table of the paper's text (`-` as None), in the printed order."
    import re
    lines, out, cur = text.split("\n"), {}, None
    for l in lines:
        m = re.match(r"Table (\d+):", l)
        if m: cur = out.setdefault(int(m.group(1)), []); continue
        if cur is None: continue
        nums = re.findall(r"(?<![\w.])-?\d+\.\d+|(?<=\t)-(?=\t|$)", l)
        if len(nums) >= 4: cur.append([None if n == "-" else float(n) for n in nums])
        elif l.startswith(("## ", "<sup>")): cur = None
    return out

@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside the checkout")
def test_every_paper_cell_matches_the_paper():
    from quantstudy.report import PAPER, TABLES
    printed = _paper_tables(PAPER_TEXT.read_text(encoding="utf-8"))
    for t in TABLES:
        if t.number not in printed:   # beyond the paper (Table 12b): nothing printed to compare with
            continue
        ours = [PAPER[t.number].get(n) for n in t.rows]
        assert [list(r) if r is not None else None for r in ours] == printed[t.number][:len(t.rows)], t.number
        assert len(printed[t.number]) == len(t.rows)   # no printed row is left out
    assert PAPER[11]["ptq-a8-channel"] == (40.09, 34.44, 35.43, 44.37)

def test_table11_has_its_8bit_per_column_row():
    from quantstudy.report import TABLES, paper_cells
    t11 = next(t for t in TABLES if t.number == 11)
    assert paper_cells(t11, "ptq-a8-channel") == ["40.09", "34.44", "35.43", "44.37"]

# item 7: the floor of the scale, per role, as the authors' minimum_range
def test_quantspec_floor_defaults_per_role():
    from quantstudy.quantizers import FLOORS, QuantSpec
    assert FLOORS == {"weight": 1e-5, "act": 1e-5, "grad": 1e-9, "moment": 1e-8}
    s = QuantSpec(8, "channel")
    assert [s.min_range(r) for r in ("weight", "act", "grad", "moment")] == [1e-5, 1e-5, 1e-9, 1e-8]
    assert QuantSpec(8, floor=1e-3).min_range("grad") == 1e-3 and QuantSpec.parse(QuantSpec(4, floor=0).name).floor == 0.0

def test_floor_binds_on_an_early_second_moment():
    "Early in training v = (1 - beta2) g^2 ~ 1e-11: below the 1e-8 floor, QAdamW's stored v8 codes are all 0."
    from quantstudy.optim import QAdamW
    for floor, zero in ((None, True), (0.0, False)):
        w = torch.nn.Parameter(torch.zeros(6, 5))
        w.grad = torch.full((6, 5), 1e-4); w.grad[0, 0] = 1.5e-4        # v = 1e-3 * 1e-8 = 1e-11 (max 2.25e-11)
        opt = QAdamW([w], lr=1e-3, optim_quant={"v": {"bits": 8, "granularity": "tensor", "floor": floor}})
        opt.step()
        codes = opt.moment_codes(w, "exp_avg_sq")
        assert bool((codes == 0).all()) == zero, floor   # with the floor: the zero bin; without: codes up to 127
        if not zero: assert codes.max().item() == 127

def test_floor_in_the_fake_and_int8_paths():
    from quantstudy.quantizers import QuantSpec, fake_quantize, quantize
    from quantstudy.fused import using_compile_policy
    g = torch.randn(64, 4096) * 1e-13                                   # a gradient far below the 1e-9 floor
    assert (QuantSpec(8, "token")(g, "grad") == 0).all() and (fake_quantize(g, 8, 0) != 0).any()
    with using_compile_policy(min_numel=0, after_numel=0):              # the fused kernel applies the same floor
        fused = QuantSpec(8, "token")(g * 1e3, "grad")
    assert torch.equal(fused, fake_quantize(g * 1e3, 8, 0, floor=1e-9))
    codes, scale, _ = QuantSpec(8).quantize(torch.full((3, 3), 1e-7), "weight")
    assert scale.item() == pytest.approx(1e-5 / 127) and (codes == 1).all()

# item 6: Adam moments quantized on linear-layer weights only; the embeddings an explicit option
def _tiny_step(recipe, seed=0):
    "A tiny GPT-2 with `recipe` after one optimizer step of `make_optimizer` on a fixed batch."
    from quantstudy.model import build_model
    from quantstudy.optim import make_optimizer
    from quantstudy.config import preset
    m = build_model("tiny", recipe, seed=seed)
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)   # the same dropout masks in every call
    m(input_ids=x, labels=x).loss.backward()
    opt, _ = make_optimizer(m, preset("smoke"), recipe)
    opt.step()
    return m, opt

def test_moments_quantized_on_linear_weights_only():
    from quantstudy.model import Recipe
    from quantstudy.optim import OptimQuant
    m, opt = _tiny_step(Recipe(optim=OptimQuant(m="8-channel", v="8-channel")))
    for emb in (m.transformer.wte.weight, m.transformer.wpe.weight):          # wte is the tied LM head too
        assert "exp_avg" in opt.state[emb] and "exp_avg_codes" not in opt.state[emb]
    assert "exp_avg_codes" in opt.state[m.transformer.h[0].attn.c_attn.weight]
    assert "exp_avg_sq_codes" in opt.state[m.transformer.h[0].mlp.c_proj.weight]
    m, opt = _tiny_step(Recipe(optim=OptimQuant(m="8-channel", embeddings=True)))  # the explicit option
    assert "exp_avg_codes" in opt.state[m.transformer.wte.weight] and OptimQuant.parse("m8-channel_emb").embeddings

# item 13: the zero bin of a baseline's fp32 v is read along the optimizer's own axis
def test_second_moment_reads_conv1d_v_along_the_optimizers_axis():
    from quantstudy.model import Recipe
    from quantstudy.optim import OptimQuant
    from quantstudy.analysis.second_moment import second_moment
    m1, o1 = _tiny_step(Recipe())                                    # fp32 v: the would-be codes of 8-channel
    m2, o2 = _tiny_step(Recipe(optim=OptimQuant(v="8-channel")))     # the same first step, v stored as 8-channel codes
    a, b = second_moment(m1, optimizer=o1, spec="8-channel"), second_moment(m2, optimizer=o2)
    assert b["stored"] == "quantized" and a["stored"] == "fp32"
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):   # Conv1D [in, out]
        assert b["per_param"][name]["stored"] == "quantized"
        assert a["per_param"][name]["zero_fraction"] == b["per_param"][name]["zero_fraction"], name
    assert a["quantized_zero_fraction"] == b["quantized_zero_fraction"]

# item 8: a divergence is recorded and the paper's run trains on; a NaN run is evaluated at its last finite checkpoint
TINY = dict(max_steps=12, eval_every=4, save_every=4, log_every=2, warmup_steps=2, eval_blocks=4, block_size=64,
            batch_size=8, micro_batch_size=8, model=dict(n_layer=1, n_head=2, n_embd=32))

def test_presets_divergence_policy():
    "Both presets train on after a divergence, as the paper's runs did: a transient spike is not the end of a run."
    from quantstudy.config import preset
    assert preset("paper").stop_on_divergence is False and preset("smoke").stop_on_divergence is False

@needs_data
def test_divergence_recorded_and_training_goes_on(tmp_path):
    from quantstudy.train import train
    from quantstudy.config import preset
    cfg = preset("smoke", **TINY, diverge_loss=0.5)   # every evaluation is above 0.5: it never gets below the bound
    res = train(cfg, tmp_path / "run")
    assert res["status"] == "diverged" and res["step"] == 12 and res["evaluable"]   # trained to max_steps, evaluated
    assert res["divergence"]["step"] == 4 and "above" in res["divergence"]["reason"]   # the first one, recorded
    assert "final eval_loss" in res["divergence"]["final"] and [p["step"] for p in res["divergence"]["spikes"]] == [4, 8, 12]
    stopped = train(preset("smoke", **TINY, diverge_loss=0.5, stop_on_divergence=True), tmp_path / "smoke")   # early stop, on request
    assert stopped["status"] == "diverged" and stopped["step"] == 4 and stopped["evaluated_checkpoint"] is None and not stopped["evaluable"]

@needs_data
def test_nan_run_is_evaluated_at_its_last_finite_checkpoint(tmp_path):
    from transformers import TrainerCallback
    from quantstudy.train import finite_weights, train
    from quantstudy.config import preset
    from quantstudy.model import load_model
    class Poison(TrainerCallback):
        "NaN weights after step 7: the loss of step 8 is NaN."
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 7:
                with torch.no_grad(): model.transformer.wte.weight.fill_(float("nan"))
    run = tmp_path / "run"
    res = train(preset("smoke", **TINY, stop_on_divergence=False), run, callbacks=[Poison()])
    assert res["status"] == "diverged" and res["step"] == 8 and res["divergence"]["nonfinite"]["step"] == 8
    assert res["evaluated_checkpoint"] == "checkpoint-4" and "checkpoint-4" in res["reason"]
    assert not finite_weights(run / "checkpoint-8") and finite_weights(run / "model")
    from safetensors.torch import load_file
    a, b = load_file(run / "checkpoint-4" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)                              # the model that is evaluated
    assert math.isfinite(load_model(run / "model")(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().item())

def test_report_shows_an_evaluated_divergent_run_with_a_note(results_like):
    import dataclasses
    from quantstudy.report import TABLES, table_rows
    from quantstudy.study import Study
    r = dataclasses.replace(results_like("a4-tensor", divergence=dict(step=4, reason="eval_loss 9.1 above 8.0 for 2 evaluations",
                                                                      spikes=[dict(step=4, loss=9.1, bound=8.0)])), status="unstable")  # trained on to 8
    t3 = next(t for t in TABLES if t.number == 3)
    rows, notes = table_rows(t3, Study("tiny", {"a4-tensor": {0: r}}))
    row = next(x for x in rows if x.name == "a4-tensor")
    assert row.cells[1].mean == r.metrics["perplexity"]["wikitext2"] > 0 and row.cells[1].n == 1      # its numbers, not a state
    assert "`a4-tensor`: unstable (spikes at step 4); trained on to step 8 and evaluated there" in notes

# item 9: three placements of the quantized output gradient, by name; g8-token-input is the authors' switch
def test_grad_placements_by_name():
    from quantstudy.qlinear import GRAD_PLACEMENTS, LinearQuant, QuantLinear
    torch.manual_seed(0)
    lin, x, g = torch.nn.Linear(24, 16), torch.randn(40, 24), torch.randn(40, 16)
    def grads(q):
        m = QuantLinear.from_linear(lin, q)
        xx = x.clone().requires_grad_(True)
        m(xx).backward(g)
        out = (xx.grad.clone(), m.weight.grad.clone())
        m.weight.grad = None; m.bias.grad = None
        return out
    fp = grads(LinearQuant())
    r = {k: grads(LinearQuant(grad="4-token", **v)) for k, v in GRAD_PLACEMENTS.items()}
    eq = lambda a, b: torch.equal(a, b)
    assert eq(r["weight"][0], fp[0]) and not eq(r["weight"][1], fp[1])      # dL/dW = Q(G)^T X only (the paper)
    assert not eq(r["input"][0], fp[0]) and eq(r["input"][1], fp[1])        # dL/dX = Q(G) W only (the authors' switch)
    assert eq(r["both"][0], r["input"][0]) and eq(r["both"][1], r["weight"][1])
    assert LinearQuant.from_dict(dict(grad="8-token", grad_placement="input")).grad_placement == "input"

def test_g8_token_input_is_the_authors_variant():
    from quantstudy.experiments import get_experiment
    q = get_experiment("g8-token-input").recipe.linear
    assert q.grad_placement == "input" and q.grad_input and not q.grad_weight
    assert get_experiment("g8-token").recipe.linear.grad_placement == "weight"

# items 2, 5, 10: the report's footnotes state the protocol; 5 seeds, population std
def _study(results_like, name="smoke", **train):
    "The `Study` `name` of three runs (their configurations as stored: each its own copy) trained with `train` and evaluated on the authors' seeds."
    from quantstudy.study import Study
    rs = {n: results_like(n) for n in ("baseline", "w4-tensor", "m8-channel")}
    for r in rs.values():
        r.config["train"].update(train)
        r.config["evals"]["downstream"]["seeds"] = [42, 1234, 1337, 2024, 1357]
    return Study(name, {n: {0: r} for n, r in rs.items()})

def test_ppl_footnotes_state_texts_1bw_floors_and_moments(results_like):
    from quantstudy.report import TABLES, render_table
    md, _ = render_table(next(t for t in TABLES if t.number == 2), _study(results_like))
    assert "wikitext-103-v1" in md and "wikitext-2-v1" in md and "joined with `\\n\\n`" in md
    assert "heldout shards 12-13" in md and "standard test shard 0" in md and "hub's `lm1b` test split is the standard" in md
    assert "1e-9 for gradients" in md and "1e-8 for optimizer states" in md and "linear layers' weights only" in md

def test_task_footnotes_state_seeds_and_std(results_like):
    from quantstudy.report import TABLES, render_table
    md, _ = render_table(next(t for t in TABLES if t.number == 6), _study(results_like))
    assert "42, 1234, 1337, 2024, 1357" in md and "population standard deviation" in md and "skipped offline" in md

def test_summary_states_the_openwebtext_split(results_like):
    from quantstudy.report import render_summary
    s = render_summary(_study(results_like, "paper", corpus="openwebtext", val_fraction=None, val_seed=None, stop_on_divergence=False))
    assert "0.5% held out, seed 2345" in s and "holds out 0.05%" in s and "trained on to `max_steps`" in s

def test_paper_evaluation_uses_the_authors_five_seeds():
    from quantstudy.experiments import EVALS, get_experiment
    assert tuple(EVALS["paper"]["downstream"]["seeds"]) == (42, 1234, 1337, 2024, 1357)
    assert tuple(get_experiment("baseline", "paper").evals["downstream"]["seeds"]) == (42, 1234, 1337, 2024, 1357)

@needs_data
def test_downstream_std_is_the_population_std():
    pytest.importorskip("lm_eval")
    from quantstudy.model import build_model
    from quantstudy.evaluate.harness import downstream
    r = downstream(build_model("tiny", seed=0).eval(), ["arc_easy"], num_fewshot=1, seeds=(0, 1, 2), limit=6)["arc_easy"]
    accs = [m["acc"] for m in r["per_seed"]]
    assert r["acc_std"] == pytest.approx(float(np.std(accs))) and r["std"].startswith("population")
    assert r["acc_std_sample"] == pytest.approx(float(np.std(accs, ddof=1)))

# item 14: each GPU kernel counted once in the linear-time share; the accounting on profiles whose answer is known
def test_linear_share_counts_each_kernel_once():
    from types import SimpleNamespace as NS
    from torch.autograd import DeviceType
    from quantstudy.analysis.linear_time import linear_share
    ev = [NS(key="aten::addmm", device_type=DeviceType.CPU, self_device_time_total=60, self_cpu_time_total=3),
          NS(key="ampere_sgemm_128x64", device_type=DeviceType.CUDA, self_device_time_total=60, self_cpu_time_total=0),
          NS(key="aten::mul", device_type=DeviceType.CPU, self_device_time_total=20, self_cpu_time_total=2),
          NS(key="vectorized_elementwise_kernel", device_type=DeviceType.CUDA, self_device_time_total=20, self_cpu_time_total=0)]
    lin, tot = linear_share(ev, "cuda")
    assert lin / tot == 0.75                                                    # summing every entry: 60 / 160, halved

def test_linear_share_on_a_cpu_profile():
    from torch.profiler import ProfilerActivity, profile
    from quantstudy.analysis.linear_time import linear_share
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3): torch.mm(a, b)
    lin, tot = linear_share(p.key_averages(), "cpu")
    assert lin > 0 and lin == pytest.approx(tot, rel=0.2)                      # only GEMMs ran: nearly all of the time
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3): torch.exp(a)
    assert linear_share(p.key_averages(), "cpu")[0] == 0                       # no GEMM: no linear time

# item 16: Table 1 (baseline against OpenAI's GPT-2) and the cross-run analysis figures
def test_table1_has_a_not_available_offline_row(results_like):
    from quantstudy.report import render_table1
    from quantstudy.study import Study
    base = results_like("baseline")
    lam = base.metrics["lambada"]                                                 # the tiny run's own LAMBADA scorer
    md, text = render_table1(Study("paper", {"baseline": {0: base}}))
    assert "| OpenAI GPT-2 124M | not available offline / 33.30 |" in md and "quantstudy run gpt2-openai" in md
    assert f"| baseline | {100 * lam['acc']:.2f} / 35.97 | {lam['ppl']:.2f} / 34.80 |" in md   # our LAMBADA row beside the paper's
    gpt2 = results_like("gpt2-openai")
    md, _ = render_table1(Study("smoke", {"baseline": {0: base}, "gpt2-openai": {0: gpt2}}))
    assert f"| OpenAI GPT-2 124M | {100 * gpt2.metrics['lambada']['acc']:.2f} | {gpt2.metrics['lambada']['ppl']:.2f} |" in md

def test_gpt2_openai_is_an_evaluation_only_experiment():
    from quantstudy.experiments import get_experiment, study_experiments
    e = get_experiment("gpt2-openai", "paper")
    assert e.pretrained == "gpt2" and set(e.evals) == {"perplexity", "lambada"} and "gpt2-openai" in study_experiments("paper")
    assert "gpt2-openai" not in study_experiments("smoke")

def test_load_pretrained_offline_says_so(tmp_path, monkeypatch):
    from quantstudy.evaluate.ptq import load_pretrained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not available offline"): load_pretrained("gpt2-nonexistent-xyz", data_dir=tmp_path)

def test_report_draws_the_cross_run_figures(results_like, tmp_path):
    from conftest import write_study
    from quantstudy.model import Recipe
    from quantstudy.optim import OptimQuant
    from quantstudy.analysis.second_moment import second_moment
    from quantstudy.report import plot_analyses, report
    from quantstudy.study import Study
    res = {}
    for name, recipe in (("baseline", Recipe()), ("v8-channel", Recipe(optim=OptimQuant(v="8-channel")))):
        m, opt = _tiny_step(recipe)
        res[name] = results_like(name, study="s", analysis={
            "second_moment": {"data": second_moment(m, optimizer=opt), "figure": "fig12_second_moment.png"}})
    paths = plot_analyses(Study("s", {n: {0: r} for n, r in res.items()}), tmp_path)
    assert [p.name for p in paths] == ["fig12_right_second_moment.png"] and paths[0].stat().st_size > 10_000
    runs = write_study(tmp_path / "runs", "s", res)
    out = report("s", runs, tmp_path / "figures")
    names = {p.name for p in out}
    assert {"fig12_right_second_moment.png", "table01_baseline_vs_gpt2.md", "table11_ptq_activations.md"} <= names

# item 15: the paper study measures memory and linear time at GPT-2 small to XL, context 1024, the paper's batches
def test_paper_analyses_run_at_the_papers_settings():
    from quantstudy.experiments import get_experiment
    s = get_experiment("baseline", "paper").analysis_settings
    assert s["memory"]["models"] == ["small", "medium", "large"] and s["memory"]["seq_len"] == 1024
    assert tuple(s["memory"]["batch_sizes"]) == (1, 2, 4, 8, 16) and s["memory"]["batch_size"] == 4
    assert s["linear_time"]["sizes"] == ["small", "medium", "large", "xl"] and 1024 in s["linear_time"]["seq_lens"]
    assert get_experiment("baseline", "smoke").analysis_settings == {}
    assert get_experiment("w4-tensor", "paper").analysis_settings == {}          # only the analyses a run has
    json.dumps(get_experiment("baseline", "paper").to_dict())
    import inspect, quantstudy.pipeline
    assert "exp.analysis_settings.get(name, {})" in inspect.getsource(quantstudy.pipeline.analyse_run)   # the pipeline passes them on

# item 12: sparse analysis snapshots at a cadence, analysed across training; Fig. 10 early on
@needs_data
def test_snapshots_outlive_checkpoint_rotation_and_are_analysed(tmp_path):
    from quantstudy.train import snapshots, train
    from quantstudy.rundir import RunDir
    from quantstudy.config import preset
    from quantstudy.analysis.activations import activations
    from quantstudy.analysis.gradients import gradients
    run = tmp_path / "run"
    train(preset("smoke", **TINY, snapshot_every=4), run)                      # saves at 4, 8, 12; keeps the last 2
    assert sorted(RunDir(run).checkpoints()) == [8, 12] and sorted(snapshots(run)) == [4, 8, 12]
    acts = activations(run, recorded=False)
    assert [s["step"] for s in acts["snapshots"]][:3] == [4, 8, 12]            # Fig. 6 across training, not the last steps only
    early = gradients(run, checkpoint="first", batch_size=2, specs=("8-token",))
    late = gradients(run, batch_size=2, specs=("8-token",))
    assert early["errors"] != late["errors"]                                   # the step-4 model, not the final one

def test_runs_analysed_across_training_keep_snapshots():
    from quantstudy.experiments import get_experiment
    assert get_experiment("baseline", "paper").train.snapshot_every == 15_000
    assert get_experiment("g8-token", "smoke").train.snapshot_every == 100
    assert get_experiment("g8-token", "smoke").analysis_settings["gradients"] == {"checkpoint": "first"}
    assert get_experiment("w4-tensor", "smoke").train.snapshot_every is None

def test_paper_micro_batch_is_the_authors():
    "Issue 20, item 2: 32 sequences per device and forward pass (global 512), as the authors trained: a per-tensor scale spans it."
    from quantstudy.config import preset
    p = preset("paper")
    assert p.micro_batch_size == 32 and p.batch_size == 512 and p.batch_size % (p.micro_batch_size * 4) == 0   # 4 GPUs: 4 accumulation steps
