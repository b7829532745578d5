"The study runner end to end: papermill runs, idempotent sweeps, failures recorded, torchrun, submitit, the CLI."
import json, subprocess, sys
from pathlib import Path
import pytest
from quantstudy.runner import run_experiment, sweep, read_results
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

def test_run_rerun_and_relative_paths(tmp_path, executions):
    root = tmp_path / "papermill_runs"
    r = run_experiment("w8a8", "t", overrides=TINY, evals=EVALS, runs_root=root)
    assert r["status"] == "complete" and r["schema"] == 1 and r["step"] == 6
    assert r["config"]["recipe"]["linear"]["weight"]["bits"] == 8 and r["metrics"]["tasks"]["mnli"]["skipped"]
    assert r["versions"]["torch"] and r["hardware"]["device"] == "cpu"
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
    assert res["w8-channel"]["status"] == "failed" and "is not UTF-8" in res["w8-channel"]["reason"]
    assert "cell" in res["w8-channel"]["reason"]                      # papermill names where it failed
    assert res["baseline"]["status"] == "complete" and res["ptq-w8-channel"]["status"] == "complete"
    assert read_results(root / "smoke" / "w8-channel")["status"] == "failed"
    assert res["baseline"]["analysis"]["second_moment"]["figure"].endswith(".png")
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

def test_nproc_2_on_cpu(tmp_path):
    r = run_experiment("w8-channel", "t", overrides={**TINY, "dropout": 0.0}, evals=ONLY_PPL,
                       runs_root=tmp_path / "papermill_runs", nproc=2)
    assert r["status"] == "complete", r.get("reason")
    tr = json.loads((tmp_path / "papermill_runs" / "t" / "w8-channel" / "train_result.json").read_text())
    assert tr["world_size"] == 2

def test_submitit_local_executor(tmp_path):
    res = sweep("smoke", "submitit-local", only=["w8a8"], overrides=TINY, evals=ONLY_PPL,
                runs_root=tmp_path / "papermill_runs", quiet=True)
    assert res["w8a8"]["status"] == "complete", res["w8a8"].get("reason")

def test_cli(tmp_path):
    exe = Path(sys.executable).with_name("quantstudy")
    out = subprocess.run([exe, "list", "--study", "smoke"], capture_output=True, text=True)
    assert out.returncode == 0 and "ptq-w8-channel" in out.stdout
    bad = subprocess.run([exe, "run", "w3-tensor"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown experiment 'w3-tensor'" in bad.stderr
    bad = subprocess.run([exe, "sweep", "smoke", "-o", "max_steps=-5"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "max_steps=-5" in bad.stderr and not (tmp_path / "papermill_runs").exists()
