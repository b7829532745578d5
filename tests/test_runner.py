"The study runner end to end: papermill runs, idempotent sweeps, failures recorded, torchrun, submitit, the CLI."
import json, subprocess, sys
from pathlib import Path
import pytest
from quantstudy.runner import run_dir, run_experiment, sweep
from quantstudy.rundir import RunDir
from quantstudy.report import report

pytestmark = pytest.mark.usefixtures("data_dir")   # every run trains on PTB: skipped without a data root

TINY = dict(max_steps=6, eval_every=3, save_every=6, log_every=1, warmup_steps=1, eval_blocks=2, block_size=32,
            batch_size=4, micro_batch_size=2, model=dict(n_layer=1, n_head=2, n_embd=32))
EVALS = dict(perplexity=dict(corpora=["ptb"], max_tokens=512), lambada=dict(limit=4),
             downstream=dict(tasks=["arc_easy", "mnli"], num_fewshot=1, seeds=[0], limit=2))
ONLY_PPL = dict(EVALS, lambada=None, downstream=None)

@pytest.fixture
def executions(monkeypatch):
    "The notebooks papermill is asked to execute from now on: a finished run must add none."
    import papermill
    calls, real = [], papermill.execute_notebook
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    return calls

def mtimes(root: Path) -> dict:
    "Each file's mtime but the run directories' `.lock`, which whoever holds the run stamps with its pid."
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".lock"}

def json_files(rd: RunDir) -> list:
    "The names of the JSON files a run directory holds at its top level."
    return sorted(p.name for p in rd.path.glob("*.json"))

def test_run_rerun_and_relative_paths(tmp_path, executions):
    root = tmp_path / "papermill_runs"
    r = run_experiment("w8a8", "t", overrides=TINY, evals=EVALS, runs_root=root)
    assert r.status == "complete" and r.schema == 2 and r.step == 6 and r.finished
    assert r.config["recipe"]["linear"]["weight"]["bits"] == 8 and r.metrics["tasks"]["mnli"]["skipped"]
    assert r.versions["torch"] and r.hardware["device"] == "cpu" and r.hardware["world_size"] == 1
    rd = run_dir("t", "w8a8", root)
    assert json_files(rd) == ["results.json", "run.json"] and rd.results() == r   # the config in run.json, no hand-off left
    run = rd.read_run()
    assert (run["study"], run["experiment"], run["preset"], run["overrides"]) == ("t", "w8a8", "smoke", TINY)
    assert {k: v for k, v in r.config.items() if k != "overrides"} == run["config"] and r.config["overrides"] == TINY
    nb = (root / "t" / "w8a8.ipynb").read_text()
    assert str(tmp_path) not in nb and "/work/" not in nb            # no machine paths in the committed notebooks
    before, ran = mtimes(root), len(executions)
    assert run_experiment("w8a8", "t", overrides=TINY, evals=EVALS, runs_root=root) == r
    assert len(executions) == ran == 1 and mtimes(root) == before     # a finished run is not run again, nothing rewritten

def test_sweep_records_a_broken_experiment_and_goes_on(tmp_path, executions):
    root = tmp_path / "papermill_runs"
    latin = tmp_path / "latin1"; latin.mkdir()   # passes every up-front check, fails to load in the kernel
    for split in ("train", "valid"): (latin / f"{split}.txt").write_bytes("caf\xe9\n\n".encode("latin1") * 100)
    res = sweep("smoke", only=["baseline", "w8-channel", "ptq-w8-channel"], overrides={**TINY}, evals=EVALS,
                analyses=["second_moment"], runs_root=root, per_experiment={"w8-channel": {"corpus": str(latin)}},
                quiet=True)
    assert res["w8-channel"].status == "failed" and "is not UTF-8" in res["w8-channel"].reason
    assert "cell" in res["w8-channel"].reason                         # papermill names where it failed
    assert res["baseline"].status == "complete" and res["ptq-w8-channel"].status == "complete"
    assert run_dir("smoke", "w8-channel", root).results() == res["w8-channel"]
    assert res["baseline"].analysis["second_moment"]["figure"].endswith(".png")
    assert res["ptq-w8-channel"].curves == res["baseline"].curves    # how the quantized model was trained
    before, ran = mtimes(root), len(executions)
    again = sweep("smoke", only=["baseline", "ptq-w8-channel"], overrides=TINY, evals=EVALS, analyses=["second_moment"],
                  runs_root=root, quiet=True)
    assert len(executions) == ran and mtimes(root) == before and again["baseline"] == res["baseline"]
    paths = report("smoke", runs_root=root, out_root=tmp_path / "figures")
    table = (tmp_path / "figures" / "smoke" / "table10_ptq_weights.md").read_text()
    assert "not run" in table and any(p.suffix == ".png" for p in paths)

def test_bad_input_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'w3'"): run_experiment("w3", runs_root=tmp_path)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"): run_experiment("baseline", overrides={"lr_max": 1}, runs_root=tmp_path)
    with pytest.raises(ValueError, match="not experiments of study"): sweep("smoke", only=["g8-token-input"], runs_root=tmp_path)
    assert not any(tmp_path.iterdir())

def test_a_failed_evaluation_keeps_the_training(tmp_path, monkeypatch):
    "The trainer's hand-off outlives a failed evaluation: the re-run evaluates the trained model, it does not train again."
    from quantstudy import pipeline, runner, train
    from quantstudy.experiments import get_experiment
    rd = run_dir("t", "w8a8", tmp_path)
    rd.write_run("t", "w8a8", get_experiment("w8a8", "smoke", ONLY_PPL, [], **TINY).to_dict(), preset="smoke", overrides=TINY)
    real = pipeline.evaluate_model
    def out_of_memory(model, evals): raise RuntimeError("out of memory")
    monkeypatch.setattr(pipeline, "evaluate_model", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"): pipeline.run_pipeline(rd.run_file)
    failed = runner._record_failure(rd, "cell 3: RuntimeError: out of memory")   # what the runner does with the kernel's error
    assert rd.results() == failed and failed.status == "failed" and not failed.finished
    trained = rd.read_training()
    assert trained["status"] == "complete" and trained["step"] == 6 and json_files(rd) == ["results.json", "run.json", "train_result.json"]
    monkeypatch.setattr(pipeline, "evaluate_model", real)
    def no_training(*a, **kw): raise AssertionError("trained again")
    monkeypatch.setattr(train, "datasets_for", no_training)
    r = pipeline.run_pipeline(rd.run_file)
    assert r.status == "complete" and r.step == 6 and r.curves == trained["curves"] and r.metrics["perplexity"]["ptb"] > 1
    assert json_files(rd) == ["results.json", "run.json"] and rd.results() == r   # finished: the hand-off is gone

def test_nproc_2_on_cpu(tmp_path):
    r = run_experiment("w8-channel", "t", overrides={**TINY, "dropout": 0.0}, evals=ONLY_PPL,
                       runs_root=tmp_path / "papermill_runs", nproc=2)
    assert r.status == "complete", r.reason
    assert r.hardware["world_size"] == 2 and run_dir("t", "w8-channel", tmp_path / "papermill_runs").read_run()["nproc"] == 2

def test_submitit_local_executor(tmp_path):
    res = sweep("smoke", "submitit-local", only=["w8a8"], overrides=TINY, evals=ONLY_PPL,
                runs_root=tmp_path / "papermill_runs", quiet=True)
    assert res["w8a8"].status == "complete", res["w8a8"].reason

def test_cli(tmp_path):
    exe = Path(sys.executable).with_name("quantstudy")
    out = subprocess.run([exe, "list", "--study", "smoke"], capture_output=True, text=True)
    assert out.returncode == 0 and "ptq-w8-channel" in out.stdout
    bad = subprocess.run([exe, "run", "w3-tensor"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown experiment 'w3-tensor'" in bad.stderr
    bad = subprocess.run([exe, "sweep", "smoke", "-o", "max_steps=-5"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "max_steps=-5" in bad.stderr and not (tmp_path / "papermill_runs").exists()


def test_a_ptq_run_starts_when_its_base_ends_not_after_every_training_run(monkeypatch):
    "Two slots, three training runs and a PTQ row on the first: the PTQ row fills the slot the last training run leaves idle."
    import threading, time
    from quantstudy import runner
    from quantstudy.rundir import Results
    log, lock, cost = [], threading.Lock(), {"baseline": 0.2, "w8-channel": 0.3, "w4-tensor": 0.6, "ptq-w8-channel": 0.1}
    def fake_run(name, **kw):
        with lock: log.append(("start", name, time.monotonic()))
        time.sleep(cost[name])
        with lock: log.append(("end", name, time.monotonic()))
        return Results(study=kw["study"], experiment=name, seed=kw["seed"])
    monkeypatch.setattr(runner, "run_experiment", fake_run)
    monkeypatch.setattr(runner, "check_inputs", lambda *a, **kw: None)
    res = sweep("smoke", jobs=2, only=["baseline", "w4-tensor", "w8-channel", "ptq-w8-channel"], quiet=True)
    assert list(res) == ["baseline", "w4-tensor", "w8-channel", "ptq-w8-channel"]
    at = {(e, n): t for e, n, t in log}
    assert at[("start", "ptq-w8-channel")] >= at[("end", "baseline")]           # never before its base
    assert at[("start", "ptq-w8-channel")] < at[("end", "w4-tensor")]           # but not after every training run
