"Training seeds as replicates: one run directory per experiment and seed, sweeps over seeds, PTQ rows paired with their base's seed, the CLI."
import json
from pathlib import Path
import pytest
from quantstudy import runner
from quantstudy.cli import main
from quantstudy.rundir import Results, RunDir, Status, run_name
from quantstudy.study import load_study, paired_effect
from quantstudy.train import training_outcome

def test_run_names():
    assert [run_name("w8a8", s) for s in (0, 1, 12)] == ["w8a8", "w8a8-seed1", "w8a8-seed12"]
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"seed=.*: must be an int >= 0"): run_name("w8a8", bad)
    assert runner.run_dir("s", "w8a8", "root", 2).path == Path("root/s/w8a8-seed2")

@pytest.mark.parametrize("seeds", [(), (0, 0), (-1,), (1.5,), (True,)])
def test_bad_seed_lists_fail_in_one_line(seeds):
    with pytest.raises(ValueError, match="must be distinct ints >= 0") as e: runner.check_seeds(seeds)
    assert "\n" not in str(e.value)

def test_seed_is_not_an_override(tmp_path, capsys):
    "`-o seed=N` would bypass the run directory's name: it is refused naming the flag to use, before anything runs."
    for argv in (["run", "baseline"], ["sweep", "smoke"]):
        assert main([*argv, "--runs-root", str(tmp_path), "-o", "seed=3", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "-o seed=3: the training seed is --seed" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())

def test_seeds_and_seed_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e: main(["sweep", "smoke", "--seeds", "3", "--seed", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    for bad in (["--seeds", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit): main(["sweep", "smoke", *bad])

def test_sweep_runs_every_experiment_with_every_seed_base_first(tmp_path, monkeypatch):
    "A sweep over seeds: one call per (experiment, seed), training rows before the PTQ rows that read them, keyed by run name."
    calls = []
    def fake(name, **kw):
        calls.append((name, kw["seed"]))
        return Results(study=kw["study"], experiment=name, seed=kw["seed"], status="complete", step=1)
    monkeypatch.setattr(runner, "run_experiment", fake)
    monkeypatch.setattr(runner, "check_inputs", lambda *a, **kw: None)
    res = runner.sweep("smoke", only=["baseline", "ptq-w8-channel", "w8a8"], seeds=(0, 2), runs_root=tmp_path, quiet=True)
    assert list(res) == ["baseline", "baseline-seed2", "w8a8", "w8a8-seed2", "ptq-w8-channel", "ptq-w8-channel-seed2"]
    assert sorted(calls) == sorted([(n, s) for n in ("baseline", "w8a8", "ptq-w8-channel") for s in (0, 2)])
    assert calls.index(("ptq-w8-channel", 2)) > max(calls.index(("baseline", 2)), calls.index(("w8a8", 2)))
    assert res["w8a8-seed2"].seed == 2 and "| w8a8 | 2 | complete |" in runner.summary_table(res)

def test_cli_seeds_reach_the_sweep(tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(runner, "sweep", lambda *a, **kw: got.update(kw) or {})
    assert main(["sweep", "smoke", "--seeds", "3", "--runs-root", str(tmp_path), "--quiet"]) == 0 and got["seeds"] == (0, 1, 2)
    assert main(["sweep", "smoke", "--seed", "4", "--runs-root", str(tmp_path), "--quiet"]) == 0 and got["seeds"] == (4,)
    assert main(["sweep", "smoke", "--runs-root", str(tmp_path), "--quiet"]) == 0 and got["seeds"] == (0,)

def test_a_ptq_seed_needs_its_base_seed(tmp_path, data_dir):
    "`ptq-w8-channel --seed 1` quantizes baseline seed 1: without it, one line naming the command that makes it."
    with pytest.raises(FileNotFoundError, match=r"baseline-seed1 has no finished results.json: run `quantstudy run baseline --study s --seed 1`"):
        runner.run_experiment("ptq-w8-channel", "s", runs_root=tmp_path, seed=1)

@pytest.mark.usefixtures("data_dir")
def test_two_seeds_of_a_real_run_and_its_ptq_pair_by_seed(tmp_path):
    "Seeds 0 and 1 through the pipeline: different data order and init, each PTQ seed quantizes its own base seed."
    from conftest import TINY_EVALS, TINY_RUN
    from quantstudy.experiments import get_experiment
    from quantstudy.pipeline import run_pipeline
    evals = dict(TINY_EVALS, lambada=None, downstream=None)
    for seed in (0, 1):
        for name in ("baseline", "ptq-w8-channel"):
            rd = runner.run_dir("s", name, tmp_path, seed)
            exp = get_experiment(name, "smoke", evals, analyses=[], seed=seed, **TINY_RUN)
            rd.write_run("s", name, exp.to_dict(), preset="smoke", overrides=TINY_RUN)
            run_pipeline(rd.run_file)
    st = load_study(tmp_path / "s")
    assert st.seeds("baseline") == st.seeds("ptq-w8-channel") == [0, 1]
    b0, b1 = st.get("baseline", 0), st.get("baseline", 1)
    assert b0.seed == 0 and b1.seed == 1 and b0.final_val_loss != b1.final_val_loss   # another init and data order
    for s in (0, 1):   # PTQ seed s carries (and quantizes) baseline seed s's training
        assert st.get("ptq-w8-channel", s).curves == st.get("baseline", s).curves
    e = paired_effect(st, "ptq-w8-channel", "log_ppl")
    assert e.n == 2 and abs(e.mean) < 0.01   # 8-bit per-channel PTQ of a tiny model: almost free

def test_outcomes_from_the_whole_curve():
    "unstable: the divergence rule fired and the run recovered; diverged: non-finite or never below ln|V|."
    val = [dict(step=s, loss=l) for s, l in [(0, 10.9), (25, 7.0), (50, 9.5), (75, 9.0), (100, 6.5)]]
    div = dict(step=75, reason="eval_loss 9.000 above 8.000 for 2 evaluations")
    st, rec = training_outcome(val, div, bound=10.8)
    assert st == "unstable" and [p["step"] for p in rec["spikes"]] == [50, 75] and rec["step"] == 75
    assert training_outcome(val[:2], None, 10.8) == ("complete", None)   # step 0 above ln|V| is the untrained model, no spike
    assert training_outcome(val, {**div, "nonfinite": dict(step=80, reason="loss is nan")}, 10.8)[0] == "diverged"
    assert training_outcome([dict(step=0, loss=10.9), dict(step=25, loss=11.2)], div, 10.8)[0] == "diverged"

def test_a_sweep_never_rewrites_a_finished_run_it_refuses(tmp_path, capsys, data_dir):
    "A sweep under other overrides than a finished run's: that run is skipped, named with why, its results.json untouched."
    from quantstudy.experiments import get_experiment
    rd = runner.run_dir("smoke", "w8a8", tmp_path)
    runner.record_run(rd, get_experiment("w8a8", "smoke"), "smoke", "smoke", {})
    rd.write_results(Results(study="smoke", experiment="w8a8", status="complete", step=300))
    before = rd.results_file.read_bytes()
    res = runner.sweep("smoke", only=["w8a8"], overrides=dict(max_steps=7), runs_root=tmp_path, quiet=True)
    assert res["w8a8"].status == "complete" and rd.results_file.read_bytes() == before
    err = capsys.readouterr().err
    assert "w8a8 skipped, its finished results.json kept as it was" in err and "max_steps: 300 -> 7" in err

def test_parallel_runs_under_a_nested_relative_root_stay_in_it(tmp_path, monkeypatch):
    "papermill chdirs the process while it executes a notebook: a run started meanwhile must not resolve its paths against that."
    import os, threading
    monkeypatch.chdir(tmp_path)
    seen = []
    def fake(name, **kw):   # the first run chdirs, as papermill does, while the second starts
        if name == "baseline": os.chdir(tmp_path / "runs" / "nested"); threading.Event().wait(0.3); os.chdir(tmp_path)
        else: threading.Event().wait(0.1)
        seen.append((name, str(kw["runs_root"])))
        return Results(study="smoke", experiment=name, status="complete", step=1)
    (tmp_path / "runs" / "nested").mkdir(parents=True)
    monkeypatch.setattr(runner, "run_experiment", fake)
    monkeypatch.setattr(runner, "check_inputs", lambda *a, **kw: None)
    runner.sweep("smoke", only=["baseline", "w8a8"], runs_root="runs/nested", jobs=2, quiet=True)
    assert {r for _, r in seen} == {str(tmp_path / "runs" / "nested")}, seen   # absolute, resolved before any run started
