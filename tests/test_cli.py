"The command line: instant help, one line and exit status 2 for bad input (no traceback), failures named, paths contained."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from quantstudy.cli import main, parse_overrides

needs_data = pytest.mark.usefixtures("data_dir")   # conftest: skipped without a data root
ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)

def test_help_imports_neither_torch_nor_transformers():
    p = _py("import sys, contextlib, io\nfrom quantstudy.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['sweep', '--help'], ['report', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try: main(argv)\n"
            "        except SystemExit as e: assert e.code == 0\n"
            "    assert 'usage: quantstudy' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'papermill', 'datasets') if m in sys.modules))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"

def test_help_names_the_allowed_values(capsys):
    for argv, wanted in ((["run", "--help"], ["{paper,smoke}", "KEY=VALUE", "model.n_layer=6", "--quiet", "letters, digits"]),
                         (["sweep", "--help"], ["{paper,smoke}", "{local,slurm,submitit-local}", "--jobs N"])):
        with pytest.raises(SystemExit) as e: main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and all(w in out for w in wanted), out

def _fails_in_one_line(capsys, argv, match) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith(f"quantstudy {argv[0]}: "), err
    assert match in err, err
    return err

BAD_OVERRIDES = [  # the cases, then more a tester tries next
    (["lr=abc"], "lr='abc': must be a finite number > 0"),
    (["corpus=nope"], "unknown corpus 'nope'"),
    (["size=huge"], "size='huge': must be one of"),
    (["model.n_head=3"], "model.n_head=3 (with n_embd=128"),
    (["model.n_layres=6"], "model.n_layres=6: unknown GPT2Config field"),
    (["val_split=heldout"], "ptb has no split 'heldout'"),
    (["model.n_layer=0"], "model.n_layer=0: must be a positive int"),
    (["max_steps=true"], "max_steps=True: must be a positive int"),
    (["dropout=2.0"], "dropout=2.0"), (["betas=[0.9]"], "betas=[0.9]"),
    (["lr=NaN"], "lr=nan"), (["max_steps=1e3"], "max_steps=1000.0"), (["precision=fp16"], "precision='fp16'"),
    (["model.n_positions=256"], "use block_size instead"), (["lr_max=1"], "unknown TrainConfig fields ['lr_max']"),
    (["val_split=train"], "val_split='train' is the training split"), (["data_dir=/nonexistent"], "data root /nonexistent"),
    (["max_steps"], "override 'max_steps' is not key=value"), (["=3"], "is not key=value"),
    (["model=3", "model.n_layer=2"], "model was given a value already"),
    (["lr.x=1"], "lr={'x': 1}"),
]

@needs_data
@pytest.mark.parametrize("overrides,match", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_overrides_fail_before_anything_runs(tmp_path, capsys, overrides, match):
    argv = ["run", "a4-tensor", "--runs-root", str(tmp_path / "runs")] + [a for o in overrides for a in ("-o", o)]
    _fails_in_one_line(capsys, argv, match)
    assert not (tmp_path / "runs").exists()

@needs_data
def test_data_root_problems_fail_before_anything_runs(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTSTUDY_DATA", str(tmp_path / "nowhere"))
    _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs")], "is not a directory")
    root = tmp_path / "data"; root.mkdir()
    for p in data_dir.iterdir():
        if p.name != "lambada": (root / p.name).symlink_to(p)
    monkeypatch.setenv("QUANTSTUDY_DATA", str(root))
    _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs")], "lambada test: no file at")
    _fails_in_one_line(capsys, ["sweep", "smoke", "--only", "w8a8", "--runs-root", str(tmp_path / "runs")], "lambada test")
    assert not (tmp_path / "runs").exists()

@needs_data
@pytest.mark.parametrize("argv,match", [
    (["run", "w3-tensor"], "unknown experiment 'w3-tensor'"),
    (["run", "ptq-w4-tensor"], "run `quantstudy run baseline --study smoke` first"),
    (["run", "a4-tensor", "--study", "../../victim", "--force"], "study name '../../victim'"),
    (["run", "a4-tensor", "--study", "/tmp/abs"], "study name '/tmp/abs'"),
    (["sweep", "smoke", "--only", "nope"], "['nope'] are not experiments of study 'smoke'"),
    (["sweep", "smoke", "-o", "corpus=nope"], "unknown corpus 'nope'"),
    (["report", "../x"], "study name '../x'"),
    (["report", "nosuch"], "no results directory"),
])
def test_bad_names_fail_in_one_line(tmp_path, capsys, argv, match):
    _fails_in_one_line(capsys, argv + ["--runs-root", str(tmp_path / "runs")], match)
    assert not (tmp_path / "runs").exists()

@pytest.mark.parametrize("argv", [["run", "w8a8", "--nproc", "0"], ["sweep", "smoke", "--jobs", "0"],
                                  ["sweep", "smoke", "--time", "x"], ["list", "--study", "tiny"], ["sweep", "big"]])
def test_bad_option_values_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as e: main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("invalid" in err or "is not an int >= 1" in err) and "Traceback" not in err, err

def test_report_cannot_escape_its_out_dir(tmp_path, capsys):
    (tmp_path / "x" / "w8a8").mkdir(parents=True); (tmp_path / "x" / "w8a8" / "results.json").write_text("{}")
    out = tmp_path / "out" / "DIR"
    _fails_in_one_line(capsys, ["report", "../x", "--runs-root", str(tmp_path / "runs"), "--out", str(out)], "study name '../x'")
    assert not out.exists() and not (tmp_path / "out" / "x").exists()

def test_report_of_an_empty_study_is_an_error_not_33_empty_figures(tmp_path, capsys):
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    _fails_in_one_line(capsys, ["report", "smoke", "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")],
                       "no <experiment>/results.json under")
    assert not (tmp_path / "fig").exists()

@needs_data
def test_corrupt_results_json_is_named(tmp_path, capsys):
    d = tmp_path / "runs" / "smoke" / "w8a8"; d.mkdir(parents=True); (d / "results.json").write_text('{"status": "comp')
    _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs")], f"{d / 'results.json'} does not load")

@needs_data
def test_a_finished_run_under_other_overrides_exits_2_unless_forced(tmp_path, capsys):
    from quantstudy.experiments import get_experiment
    from quantstudy.rundir import Results, RunDir
    RunDir(tmp_path / "runs" / "smoke" / "w8a8").write_results(   # a finished run of the smoke preset, as an older runner left it
        Results(study="smoke", experiment="w8a8", status="complete", step=300, config=dict(**get_experiment("w8a8").to_dict(), overrides={})))
    assert main(["run", "w8a8", "--runs-root", str(tmp_path / "runs")]) == 0   # the same: the finished result
    assert "| w8a8 | 0 | complete | 300 |" in capsys.readouterr().out
    _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs"), "-o", "lr=0.05"], "train.lr: 0.002 -> 0.05")
    _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs"), "-o", "model.n_layer=6"],
                       "train.model.n_layer: 4 -> 6")

@needs_data
def test_a_second_writer_is_refused(tmp_path, capsys):
    from quantstudy.runner import run_dir
    with run_dir("smoke", "w8a8", tmp_path / "runs").lock():
        _fails_in_one_line(capsys, ["run", "w8a8", "--runs-root", str(tmp_path / "runs")], f"is in use by pid {os.getpid()}")

FAILING_TEMPLATE = {"cells": [
    {"cell_type": "code", "id": "p", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [], "source": "run_json = None"},
    {"cell_type": "code", "id": "b", "metadata": {}, "execution_count": None, "outputs": [],
     "source": "print('step 1', flush=True)\nraise ValueError('boom at step 2')"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}

@needs_data
def test_a_failed_run_says_why_on_the_terminal(tmp_path, capsys, monkeypatch):
    from quantstudy import runner
    tpl = tmp_path / "t.ipynb"; tpl.write_text(json.dumps(FAILING_TEMPLATE))
    monkeypatch.setattr(runner, "TEMPLATE", tpl)
    assert main(["run", "a4-tensor", "--runs-root", str(tmp_path / "runs")]) == 1
    out, err = capsys.readouterr()
    assert "step 1" in out and "| a4-tensor | 0 | failed | 0 |" in out                      # the run's output, streamed
    assert "a4-tensor failed: cell 2: ValueError: boom at step 2" in err and "results.json" in err

def test_parse_overrides_nested_and_repeated():
    assert parse_overrides(["model.n_layer=6", "model.n_head=2", "lr=1e-3", "data_dir=null"]) == \
        {"model": {"n_layer": 6, "n_head": 2}, "lr": 1e-3, "data_dir": None}
    assert parse_overrides(["model.n_layer=6", 'model={"n_head": 2}']) == {"model": {"n_layer": 6, "n_head": 2}}

def test_evaluate_cli_bad_path_and_unknown_task(tmp_path):
    pytest.importorskip("lm_eval")
    from quantstudy.evaluate.harness import main as evaluate
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match=r"path=.*run: not a run directory \(with model/\) or a model directory"):
        evaluate(["run", "--model", "quantstudy", "--model_args", f"path={tmp_path / 'run'}", "--tasks", "arc_easy", "--limit", "1"])
    with pytest.raises(SystemExit, match="python -m quantstudy.evaluate: ValueError: Tasks not found: nosuchtask"):
        evaluate(["run", "--model", "quantstudy", "--model_args", f"path={tmp_path / 'run'}", "--tasks", "nosuchtask"])

STUDY_COMMANDS = {   # every subcommand that takes a study name: where the name goes
    "run": lambda bad: ["run", "w8a8", "--study", bad], "sweep": lambda bad: ["sweep", bad, "--out", "{out}"],
    "study": lambda bad: ["study", bad, "--out", "{out}"], "report": lambda bad: ["report", bad, "--out", "{out}"],
    "scorecard": lambda bad: ["scorecard", bad, "--out", "{out}"]}

@pytest.mark.parametrize("bad", ["../x", "ABSOLUTE"])
@pytest.mark.parametrize("command", list(STUDY_COMMANDS))
def test_every_study_name_is_contained(tmp_path, capsys, command, bad):
    roots = tmp_path / "roots"; runs, out = roots / "runs", roots / "figs"
    bad = str(tmp_path / "abs") if bad == "ABSOLUTE" else bad
    for victim in (roots / "x", tmp_path / "abs"):   # what ../x (from either root) or the absolute name would reach: a real study
        (victim / "w8a8").mkdir(parents=True); (victim / "w8a8" / "results.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(out=out) for a in STUDY_COMMANDS[command](bad)] + ["--runs-root", str(runs)]
    try: code = main(argv)
    except SystemExit as e: code = e.code   # sweep and study: a name outside argparse's choices
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"quantstudy {command}: ") and "Traceback" not in err, err
    assert repr(bad) in err or "invalid choice" in err, err
    assert sorted(tmp_path.rglob("*")) == before   # nothing written anywhere: not the roots, not the victims
