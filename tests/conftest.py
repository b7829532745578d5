"Shared fixtures: the data root, an isolated token cache, a tiny training config and model, a real tiny run and Results built from it; the `numerics` marker."
import os
from pathlib import Path
import pytest

# the data root: $QUANTSTUDY_DATA, else shared/data beside the repository (where the Makefile points it)
DATA = Path(os.environ.get("QUANTSTUDY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAVE_DATA = (DATA / "ptb").is_dir()

def pytest_configure(config):
    config.addinivalue_line("markers", "numerics: compares floating-point outcomes; `make numerics` reruns these "
                                       "under AVX2 kernels and 2 threads (see the Makefile)")

@pytest.fixture(scope="session", autouse=True)
def _data_env(tmp_path_factory):
    "Every test (and fixture) sees the data root in $QUANTSTUDY_DATA and a token cache of this session."
    with pytest.MonkeyPatch.context() as mp:
        if HAVE_DATA: mp.setenv("QUANTSTUDY_DATA", str(DATA))
        mp.setenv("QUANTSTUDY_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
        yield

@pytest.fixture(scope="session")
def data_dir() -> Path:
    "The local data root; a test that asks for it is skipped where there is none."
    if not HAVE_DATA: pytest.skip(f"no data root at {DATA} (set QUANTSTUDY_DATA)")
    return DATA

@pytest.fixture(scope="session")
def tiny_config(data_dir):
    "A factory of 2-layer, 32-wide smoke configs on PTB (its ~80k-token valid split as the training set: fast)."
    from quantstudy.config import TrainConfig
    base = dict(size="tiny", model=dict(n_layer=2, n_head=2, n_embd=32), corpus="ptb", train_split="valid",
                val_split="test", data_dir=str(data_dir), block_size=32, batch_size=8, micro_batch_size=4, max_steps=24,
                warmup_steps=2, eval_every=8, eval_blocks=8, log_every=2, save_every=4, lr=3e-3)
    return lambda **kw: TrainConfig(**{**base, **kw})

@pytest.fixture(scope="session")
def tiny_model():
    "A factory of seeded tiny GPT-2s (2 layers, 32 wide, 32 positions unless overridden), quantized by `recipe`."
    from quantstudy.model import build_model
    return lambda recipe=None, **kw: build_model("tiny", recipe, seed=0, **{**dict(n_layer=2, n_embd=32, n_positions=32), **kw})

# A real run, made once per session: the report's, scorecard's and runner's tests read what a run writes, not a
# hand-written dict. It goes through the pipeline the template calls (no papermill kernel: seconds, not a minute).
TINY_RUN = dict(max_steps=8, eval_every=4, save_every=8, log_every=2, warmup_steps=1, eval_blocks=2, block_size=32,
                batch_size=4, micro_batch_size=4, model=dict(n_layer=1, n_head=2, n_embd=32))
TINY_EVALS = dict(perplexity=dict(corpora=["wikitext2", "ptb"], max_tokens=1024), lambada=dict(limit=8),
                  downstream=dict(tasks=["arc_easy", "mnli"], num_fewshot=1, seeds=[0], limit=2))

@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    "The `RunDir` of a real tiny baseline run (8 steps, evaluated on slices, no analyses) of study `tiny`."
    from quantstudy.experiments import get_experiment
    from quantstudy.pipeline import run_pipeline
    from quantstudy.rundir import RunDir
    rd = RunDir(tmp_path_factory.mktemp("runs") / "tiny" / "baseline")
    exp = get_experiment("baseline", "smoke", TINY_EVALS, analyses=[], **TINY_RUN)
    rd.write_run("tiny", "baseline", exp.to_dict(), preset="smoke", overrides=TINY_RUN)
    run_pipeline(rd.run_file)
    return rd

@pytest.fixture(scope="session")
def results_like(tiny_run):
    """A factory of `Results` of experiment `name`: the tiny run's, with that experiment's configuration, ended as
    `status` at `step`, its validation curve shifted to end at `final_loss` and its perplexities scaled to match."""
    import dataclasses, json, math
    from quantstudy.experiments import get_experiment
    def make(name, status="complete", final_loss=None, step=None, study="tiny", skipped=None, **fields):
        real = tiny_run.results()   # read afresh: each Results its own, a test that edits one changes no other
        cfg = json.loads(json.dumps({**get_experiment(name, "smoke", TINY_EVALS, **TINY_RUN).to_dict(), "overrides": TINY_RUN}))  # as stored
        val = [dict(p) for p in real.curves["val"]]
        step = real.step if step is None else step
        if step != real.step: val = [dict(p, step=round(p["step"] * step / real.step)) for p in val]
        shift = 0.0 if final_loss is None else final_loss - val[-1]["loss"]
        for p in val: p["loss"] += shift
        metrics = {} if status in ("failed", "diverged") else {**real.metrics, "perplexity": {k: v * math.exp(shift) for k, v in real.metrics["perplexity"].items()},
                                                  "tasks": {**real.metrics["tasks"], **{t: {"skipped": why} for t, why in (skipped or {}).items()}}}
        reason = {"complete": None, "unstable": "eval_loss above the divergence bound for 2 evaluations",
                  "diverged": "loss is nan at step 6",
                  "failed": "cell 3: RuntimeError: out of memory"}[status]
        return dataclasses.replace(real, study=study, experiment=name, status=status, step=step, reason=reason, config=cfg,
                                   curves=dict(real.curves, val=val), metrics=metrics, **fields)
    return make

def write_study(root, study: str, results):
    "Write `results` (name -> `Results`, or a list of `Results` of any seeds) as the study `study` under the runs root `root`, the way runs write them; `root`."
    from pathlib import Path
    from quantstudy.rundir import RunDir, run_name
    for r in (results.values() if isinstance(results, dict) else results):
        RunDir(Path(root) / study / run_name(r.experiment, r.seed)).write_results(r)
    return root
