"`make smoke`'s verdict: a fresh run of the smoke study held against the committed reference, run by run."
import json, shutil
from pathlib import Path
import pytest
from quantstudy import runner
from quantstudy.cli import main
from quantstudy.experiments import study_experiments

REFERENCE = Path(__file__).resolve().parents[1] / "papermill_runs"   # the committed smoke study
N = len(study_experiments("smoke"))

@pytest.fixture
def fresh(tmp_path):
    "A copy of the reference's results, as if this machine had just trained them."
    for n in study_experiments("smoke"):
        src = REFERENCE / "smoke" / n / "results.json"
        (tmp_path / "smoke" / n).mkdir(parents=True)
        shutil.copy(src, tmp_path / "smoke" / n / "results.json")
    return tmp_path

def edit(root, name, fn):
    p = root / "smoke" / name / "results.json"
    r = json.loads(p.read_text()); fn(r); p.write_text(json.dumps(r))

def test_identical_runs_reproduce(fresh):
    table, ok = runner.compare_studies("smoke", fresh, REFERENCE)
    assert ok and f"Reproduced: {N} of {N}" in table and "**no**" not in table

@pytest.mark.parametrize("change,reproduced", [
    (lambda r: r["curves"]["val"][-1].update(loss=r["curves"]["val"][-1]["loss"] + 0.019), True),    # within 0.02 nats
    (lambda r: r["curves"]["val"][-1].update(loss=r["curves"]["val"][-1]["loss"] + 0.021), False),
    (lambda r: r["metrics"]["perplexity"].update(ptb=r["metrics"]["perplexity"]["ptb"] * 1.03), True),   # log 1.03 < 0.05
    (lambda r: r["metrics"]["perplexity"].update(ptb=r["metrics"]["perplexity"]["ptb"] * 1.06), False),  # log 1.06 > 0.05
    (lambda r: r.update(status="diverged"), False),
    (lambda r: r.update(status="failed"), False)])
def test_a_run_that_moved_is_named(fresh, change, reproduced):
    edit(fresh, "w8a8", change)
    table, ok = runner.compare_studies("smoke", fresh, REFERENCE)
    row = next(l for l in table.splitlines() if l.startswith("| w8a8 |"))
    assert ok == reproduced and row.endswith("| yes |" if reproduced else "| **no** |")

def test_two_divergences_at_different_steps_reproduce(fresh):
    assert json.loads((REFERENCE / "smoke/v8-channel/results.json").read_text())["status"] == "diverged"
    edit(fresh, "v8-channel", lambda r: r.update(step=75))          # chaotic: the step may differ between CPUs
    assert runner.compare_studies("smoke", fresh, REFERENCE)[1]

def test_a_missing_run_does_not_reproduce(fresh):
    shutil.rmtree(fresh / "smoke" / "baseline")
    table, ok = runner.compare_studies("smoke", fresh, REFERENCE)
    assert not ok and "| baseline | not run |" in table

def test_cli_reference_exit_code(fresh, monkeypatch, capsys):
    "`quantstudy study smoke --reference`: the sweep (stubbed here: nothing to train) then the verdict and its exit code."
    monkeypatch.setattr(runner, "sweep", lambda study, *a, **kw: {n: runner.run_dir(study, n, fresh).results()
                                                                   for n in study_experiments(study)})
    args = ["sweep", "smoke", "--runs-root", str(fresh), "--reference", str(REFERENCE)]
    assert main(args) == 0 and f"Reproduced: {N} of {N}" in capsys.readouterr().out
    edit(fresh, "baseline", lambda r: r["curves"]["val"][-1].update(loss=9.0))
    assert main(args) == 1 and f"NOT reproduced: {N - 1} of {N}" in capsys.readouterr().out
