"Evaluation: windows, agreement with lm-eval (rolling perplexity, LAMBADA), offline tasks, downstream, PTQ, the CLI."
import math, os, subprocess, sys
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, strategies as st

from quantstudy.data import load_corpus
from quantstudy.model import Recipe, build_model, save_model
from quantstudy.qlinear import LinearQuant, quantized_modules
from quantstudy.evaluate.tables import task_table
from quantstudy.paper import TASKS as PAPER_TASKS
from quantstudy.evaluate.harness import downstream, model_dir
from quantstudy.evaluate.lambada import lambada
from quantstudy.evaluate.perplexity import Perplexity, perplexity, windows
from quantstudy.evaluate.ptq import ptq
from quantstudy.evaluate.tasks import TASK_FILES, TASKS_DIR, task_dataset, task_unavailable

lm_eval = pytest.importorskip("lm_eval")
from quantstudy.evaluate.harness import QuantstudyLM

@pytest.fixture(scope="module")
def model(): return build_model("tiny", seed=0).eval()

@pytest.fixture(scope="module")
def text(data_dir): return "".join(load_corpus("wikitext2", "test", data_dir, limit=60)["text"])   # ~3,200 GPT-2 tokens: 25 windows

@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(2, 300), st.data())
def test_windows_score_every_target_once(n, context, data):
    stride = data.draw(st.one_of(st.none(), st.integers(1, context)))
    ws = windows(n, context, stride)
    scored = [j for b, e, f in ws for j in range(f, e + 1)]
    assert all(0 <= b < f <= e < n and e - b <= context for b, e, f in ws)
    if stride is None: assert scored == [j for j in range(1, n) if j % context]   # block starts are never targets
    else: assert scored == list(range(1, n))                                        # every token but the first, once

def _lm_eval_ppl(model, text):
    from lm_eval.api.instance import Instance
    lm = QuantstudyLM(pretrained=model, batch_size=4)
    ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    ids = lm.tok_encode(text)
    return math.exp(-ll / len(ids)), ids

@pytest.mark.numerics
@pytest.mark.parametrize("recipe", [None, Recipe(linear=LinearQuant(weight="4-channel", act="8-token"))])
def test_perplexity_equals_lm_eval_rolling(text, recipe):
    "Cross-check: token-weighted perplexity = exp(-loglikelihood_rolling / tokens), full precision and quantized."
    m = build_model("tiny", recipe=recipe, seed=0).eval()
    ref, ids = _lm_eval_ppl(m, text)
    ours = perplexity(m, ids, stride=m.config.n_positions, eos_prefix=True, batch_size=8, progress=False)
    assert ours.tokens == len(ids) > 3 * m.config.n_positions
    assert ours.ppl == pytest.approx(ref, rel=5e-3)          # the required 0.5%; in fact ~1e-7
    if recipe is not None:   # the quantization is really applied
        fp = perplexity(build_model("tiny", seed=0), ids, stride=128, eos_prefix=True, progress=False)
        assert abs(math.log(fp.ppl / ours.ppl)) > 1e-4

@pytest.mark.numerics
def test_perplexity_blocks_and_modes(model, text):
    ids = QuantstudyLM(pretrained=model).tok_encode(text)[:1000]
    r = perplexity(model, ids, progress=False)
    assert isinstance(r, Perplexity) and r.windows == 8 and r.tokens == 1000 - 8   # 7 full blocks + a partial one
    assert r.ppl != pytest.approx(r.ppl_windows, rel=1e-9)     # the partial block weighs more in the authors' mean
    full = perplexity(model, ids, drop_last=True, progress=False)
    assert full.windows == 7 and full.ppl == pytest.approx(full.ppl_windows, rel=1e-9)
    one = perplexity(model, ids, batch_size=1, progress=False)
    assert one.ppl == pytest.approx(r.ppl, rel=1e-5)          # batching changes nothing (no padding)
    model.train()
    perplexity(model, ids[:300], progress=False)
    assert model.training; model.eval()                        # mode restored
    with pytest.raises(ValueError, match="n_positions"): perplexity(model, ids, context=256)
    with pytest.raises(ValueError, match="make no window"): perplexity(model, ids[:100], drop_last=True)

@pytest.mark.numerics
@pytest.mark.usefixtures("data_dir")
def test_lambada_equals_lm_eval_zero_shot(model):
    ours = lambada(model, limit=24, batch_size=5, progress=False)
    ref = downstream(model, ["lambada_openai"], num_fewshot=0, seeds=(0,), limit=24)["lambada_openai"]
    assert ours["n"] == ref["n"] == 24
    assert ours["acc"] == ref["acc"] and ours["ppl"] == pytest.approx(ref["perplexity"], rel=1e-4)

@pytest.mark.usefixtures("data_dir")
def test_downstream_skips_missing_and_averages_seeds(model):
    res = downstream(model, ["mnli", "arc_challenge", "rte", "wnli"], num_fewshot=2, seeds=(0, 1), limit=3)
    assert list(res) == ["mnli", "arc_challenge", "rte", "wnli"]
    assert set(res["mnli"]) == {"skipped"} and "MNLI" in res["mnli"]["skipped"] and "WNLI" in res["wnli"]["skipped"]
    for t in ("arc_challenge", "rte"):
        r = res[t]
        assert r["n"] == 3 and r["seeds"] == [0, 1] and len(r["per_seed"]) == 2 and 0 <= r["acc"] <= 1 and r["acc_std"] >= 0
        assert r["acc"] == pytest.approx(sum(p["acc"] for p in r["per_seed"]) / 2)
    table = task_table({("", "baseline"): res})
    assert "| - |" in table and "(2 of 10)" in table                     # missing tasks: '-', never 0

@pytest.mark.usefixtures("data_dir")
def test_offline_tasks_keep_lm_eval_prompts():
    "Our YAMLs keep lm-eval's built-in prompt, target, choices and metrics for every task."
    from lm_eval.tasks._yaml_loader import load_yaml
    builtin = Path(lm_eval.__file__).parent / "tasks"
    where = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
             "lambada_openai": "lambada/lambada_openai.yaml", "sst2": "glue/sst2/default.yaml",
             "mrpc": "glue/mrpc/default.yaml", "qnli": "glue/qnli/default.yaml", "rte": "glue/rte/default.yaml"}
    assert set(where) == set(TASK_FILES) and set(TASK_FILES) < set(PAPER_TASKS)
    for task, rel in where.items():
        ours = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=False, recursive=True)
        ref = load_yaml(builtin / rel, resolve_func=False, recursive=True)
        assert ours["task"] == task
        for k in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list"):
            assert ours.get(k) == ref.get(k), (task, k)
        assert task_unavailable(task) is None

@pytest.mark.usefixtures("data_dir")
def test_task_data_shapes():
    hs = task_dataset("hellaswag")["validation"]
    assert len(hs) == 10042 and all(len(c) == 4 for c in hs[:50]["choices"])
    assert hs[1]["query"].startswith("Clean and jerk: ") and hs[1]["query"].endswith("grabs the pole. The lady")
    arc = task_dataset("arc_easy")
    assert {s: len(d) for s, d in arc.items()} == dict(train=2251, validation=570, test=2376)
    assert all(d["answerKey"] in d["choices"]["label"] for d in arc["test"])
    assert sorted(set(task_dataset("qnli")["validation"]["label"])) == [0, 1]
    with pytest.raises(FileNotFoundError, match="MNLI"): task_dataset("mnli")

@pytest.mark.numerics
def test_ptq_copies_and_quantizes(model, text):
    ids = QuantstudyLM(pretrained=model).tok_encode(text)[:512]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = ptq(model, LinearQuant(weight="4-tensor"))
    assert quantized_modules(model) == {} and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert q.lm_head.weight is q.transformer.wte.weight and len(quantized_modules(q)) == 9
    assert q.recipe == Recipe(linear=LinearQuant(weight="4-tensor"))
    base, w4 = (perplexity(m, ids, progress=False).ppl for m in (model, q))
    assert base != w4
    a8 = ptq(model, LinearQuant(act="8-channel"), modules="all-linear-no-head")
    assert len(quantized_modules(a8)) == 8 and "lm_head" not in quantized_modules(a8)
    with pytest.raises(ValueError, match="gradient"): ptq(model, LinearQuant(grad="8-token"))
    with pytest.raises(ValueError, match="quantized already"): ptq(q, "8-channel")

@pytest.mark.usefixtures("data_dir")
def test_quantstudy_lm_loads_run_dir_with_recipe(tmp_path):
    recipe = Recipe(linear=LinearQuant(weight="8-channel"))
    save_model(build_model("tiny", recipe=recipe, seed=1), tmp_path / "run" / "model")
    assert model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    lm = QuantstudyLM(path=str(tmp_path / "run"), device="cuda:0")   # no GPU here: falls back to the CPU
    assert lm.model.recipe == recipe and len(quantized_modules(lm.model)) == 9 and lm.max_length == 128
    assert lm.tok_encode("Hello world") == [15496, 995]               # no prefix space, as lm-eval's hf model
    with pytest.raises(ValueError, match="exactly one"): QuantstudyLM()
    from lm_eval.api.registry import get_model
    assert get_model("quantstudy") is QuantstudyLM and get_model("hf").__name__ == "HFLM"

@pytest.mark.usefixtures("data_dir")
def test_cli_runs_on_saved_model(tmp_path):
    save_model(build_model("tiny", seed=0), tmp_path / "model")
    cmd = [sys.executable, "-m", "quantstudy.evaluate", "--model", "quantstudy", "--model_args", f"path={tmp_path}",
           "--tasks", "arc_easy", "--num_fewshot", "1", "--limit", "2", "--device", "cpu", "--batch_size", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|arc_easy" in out.stdout and "acc" in out.stdout and "quantstudy" in out.stdout

@pytest.mark.usefixtures("data_dir")
def test_downstream_rejects_unknown_task(model):
    with pytest.raises(ValueError, match="arc_eazy"): downstream(model, ["arc_eazy"], limit=1)
