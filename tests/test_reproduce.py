"`make smoke`'s verdict: a fresh run of the smoke study held against the committed reference's seed distribution."
import json, shutil
from pathlib import Path
import pytest
from quantstudy import runner
from quantstudy.cli import main
from quantstudy.experiments import study_experiments
from quantstudy.reproduce import MARGIN_SDS, bands, compare_studies, judge_run
from quantstudy.rundir import run_name
from quantstudy.study import load_study

REFERENCE = Path(__file__).resolve().parents[1] / "papermill_runs"   # the committed smoke study, 3 seeds per experiment
NAMES = study_experiments("smoke")
N = len(NAMES)

@pytest.fixture(scope="module")
def ref():
    return load_study(REFERENCE / "smoke")

@pytest.fixture
def fresh(tmp_path):
    "Seed 1 of the reference, as if this machine had just trained it (seed 1 is one of the reference's own draws)."
    for n in NAMES:
        src = REFERENCE / "smoke" / run_name(n, 1) / "results.json"
        (tmp_path / "smoke" / run_name(n, 1)).mkdir(parents=True)
        shutil.copy(src, tmp_path / "smoke" / run_name(n, 1) / "results.json")
    return tmp_path

def edit(root, name, fn, seed=1):
    p = root / "smoke" / run_name(name, seed) / "results.json"
    r = json.loads(p.read_text()); fn(r); p.write_text(json.dumps(r))

def compare(root, ref):
    return compare_studies(load_study(root / "smoke"), ref, NAMES, seeds=(1,))

def test_the_reference_has_three_seeds_of_every_experiment(ref):
    assert all(ref.seeds(n) == [0, 1, 2] for n in NAMES), {n: ref.seeds(n) for n in NAMES}
    assert all(r.schema == 2 and r.seed == s for n in NAMES for s, r in ref.runs[n].items())

def test_every_reference_seed_reproduces_the_reference(ref):
    "Each reference seed lies within the bands (they contain it by construction): the rule rejects none of its own draws."
    for seed in (0, 1, 2):
        table, ok = compare_studies(ref, ref, NAMES, seeds=(seed,))
        assert ok and f"Reproduced: {N} of {N}" in table, table

def test_margin_is_k_seed_sds(ref):
    b = bands(ref)["baseline"]["val loss"]
    assert b.n == 3 and b.margin >= MARGIN_SDS * b.sd > 0

def _shift_loss(by):
    def f(r):
        r["curves"]["val"][-1]["loss"] += by
    return f

@pytest.mark.parametrize("margins,reproduced", [(0.5, True), (1.5, False)])
def test_a_loss_beyond_the_widened_interval_is_named(fresh, ref, margins, reproduced):
    b = bands(ref)["w8a8"]["val loss"]
    now = load_study(fresh / "smoke").get("w8a8", 1).final_val_loss
    edit(fresh, "w8a8", _shift_loss(b.hi + margins * b.margin - now))
    table, ok = compare(fresh, ref)
    row = next(l for l in table.splitlines() if l.startswith("| w8a8 |"))
    assert ok == reproduced and ("| yes |" in row) == reproduced, row

def test_a_log_perplexity_beyond_its_band_is_named(fresh, ref):
    b = bands(ref)["w8a8"]["log-ppl ptb"]
    edit(fresh, "w8a8", lambda r: r["metrics"]["perplexity"].update(ptb=2.718281828 ** (b.hi + 2 * b.margin)))
    row = judge_run(load_study(fresh / "smoke"), ref, "w8a8", 1)
    assert not row["reproduced"] and any(w.startswith("log-ppl ptb") for w in row["why"]), row

def test_an_outcome_no_reference_seed_had_does_not_reproduce(fresh, ref):
    had = set(ref.outcomes("w8a8").values())
    assert had == {"complete"}, had
    edit(fresh, "w8a8", lambda r: r.update(status="unstable"))
    row = judge_run(load_study(fresh / "smoke"), ref, "w8a8", 1)
    assert not row["reproduced"] and "outcome unstable, reference seeds complete" in row["why"][0]

def test_a_failed_or_missing_run_does_not_reproduce(fresh, ref):
    edit(fresh, "w8a8", lambda r: r.update(status="failed", reason="cell 3: RuntimeError: out of memory"))
    shutil.rmtree(fresh / "smoke" / run_name("baseline", 1))
    table, ok = compare(fresh, ref)
    assert not ok and "| baseline | 1 | not run |" in table and "failed: cell 3" in table

def test_cli_reference_exit_code(fresh, monkeypatch, capsys):
    "`quantstudy sweep smoke --seed 1 --reference`: the sweep (stubbed: nothing to train), the verdict and its exit code."
    monkeypatch.setattr(runner, "sweep", lambda study, *a, **kw: {run_name(n, 1): runner.run_dir(study, n, fresh, 1).results() for n in NAMES})
    args = ["sweep", "smoke", "--seed", "1", "--runs-root", str(fresh), "--reference", str(REFERENCE)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"Reproduced: {N} of {N}" in out and "The reference's seed spread" in out
    edit(fresh, "baseline", _shift_loss(3.0))
    assert main(args) == 1 and f"NOT reproduced: {N - 1} of {N}" in capsys.readouterr().out
