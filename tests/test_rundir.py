"The run directory and its results schema: refusals in one line, a lossless round trip, atomic writes, one writer, the template shipped."
import dataclasses, json, os, subprocess, sys
from pathlib import Path
import pytest
from hypothesis import given, settings, strategies as st
import quantstudy
from quantstudy.experiments import get_experiment
from quantstudy.model import Recipe
from quantstudy.qlinear import LinearQuant
from quantstudy.rundir import SCHEMA, Results, RunDir, RunInUse, Status, write_json
from quantstudy import runner

# ---- Results.from_dict: another schema, a field it does not know, a missing name: one line naming the value

def _stored(**kw) -> dict:
    "A `results.json` object as `write_results` stores it, through JSON."
    return json.loads(json.dumps(Results(study="s", experiment="w8a8", status="complete", step=6, **kw).to_dict()))

def _one_line(e) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)

def test_another_schema_is_refused_naming_it():
    d = _stored(); d["schema"] = 3
    with pytest.raises(ValueError, match=r"runs/s/w8a8/results.json: results schema 3; this quantstudy reads schema 2.*--force") as e:
        Results.from_dict(d, "runs/s/w8a8/results.json")
    _one_line(e)
    del d["schema"]   # a file from before the schema was versioned
    with pytest.raises(ValueError, match=r"results schema None") as e: Results.from_dict(d)
    _one_line(e)

def test_unknown_fields_are_refused_naming_them():
    d = _stored(); d["figures"] = ["fig2"]; d["replicate"] = 0   # fields an older writer put at the top level
    with pytest.raises(ValueError, match=r"unknown fields \['figures', 'replicate'\] for results schema 2") as e: Results.from_dict(d)
    _one_line(e)

def test_schema_1_is_read_with_the_seed_of_its_config():
    "Schema 1 had no `seed` field and no `unstable` status: its files are read, the seed taken from the run's config."
    d = _stored(config=dict(train=dict(seed=7))); d["schema"] = 1; del d["seed"]
    r = Results.from_dict(d)
    assert r.seed == 7 and r.schema == SCHEMA == 2
    assert Results.from_dict({**d, "config": {}}).seed == 0

@pytest.mark.parametrize("name", ["study", "experiment"])
def test_a_missing_name_is_refused(name):
    d = _stored(); del d[name]
    with pytest.raises(ValueError, match=rf"fields \['{name}'\] are missing") as e: Results.from_dict(d)
    _one_line(e)

def test_not_an_object_is_refused():
    with pytest.raises(ValueError, match="x.json: not a JSON object"): Results.from_dict([1, 2], "x.json")

def test_status_refuses_done():
    with pytest.raises(ValueError, match="'done'"): Status("done")
    with pytest.raises(ValueError, match=r"status='done': use one of \['complete', 'unstable', 'diverged', 'failed'\]") as e:
        Results(study="s", experiment="e", status="done")
    _one_line(e)
    d = _stored(); d["status"] = "done"
    with pytest.raises(ValueError, match="status='done'"): Results.from_dict(d)

def test_status_is_a_str_enum_and_finished_means_trained_to_an_end():
    assert Results(study="s", experiment="e", status="complete").status == "complete"
    assert [Results(study="s", experiment="e", status=s).finished for s in Status] == [True, True, True, False]
    assert Results(study="s", experiment="e").status is Status.FAILED   # failed until the run says otherwise

# ---- a lossless round trip through JSON, for any field values

finite = st.floats(allow_nan=False, allow_infinity=False)
keys = st.text(max_size=6)
metrics = st.dictionaries(keys, st.recursive(finite, lambda inner: st.dictionaries(keys, inner, max_size=3), max_leaves=8), max_size=4)
points = st.lists(st.fixed_dictionaries(dict(step=st.integers(0, 10**9), loss=finite)), max_size=5)

@settings(max_examples=200, deadline=None)
@given(status=st.sampled_from([*Status, *(s.value for s in Status)]), step=st.integers(0, 2**53),
       reason=st.none() | st.text(max_size=30), study=st.text(min_size=1, max_size=10), metrics=metrics,
       curves=st.fixed_dictionaries(dict(train=points, val=points)), timings=st.dictionaries(keys, finite, max_size=3),
       evaluated=st.none() | st.from_regex(r"checkpoint-[0-9]{1,5}", fullmatch=True))
def test_results_survive_json(status, step, reason, study, metrics, curves, timings, evaluated):
    r = Results(study=study, experiment="w8a8", status=status, step=step, reason=reason, metrics=metrics, curves=curves,
                timings=timings, evaluated_checkpoint=evaluated, analysis=dict(second_moment=dict(data=metrics)))
    back = Results.from_dict(json.loads(json.dumps(r.to_dict(), default=float)))
    assert back == r and isinstance(back.status, Status) and back.schema == SCHEMA
    assert back.final_val_loss == (curves["val"][-1]["loss"] if curves["val"] else None)

# ---- write_results: the one writer, atomic

def test_write_results_round_trips_and_leaves_no_temp_file(tmp_path):
    rd = RunDir(tmp_path / "s" / "e")
    r = Results(study="s", experiment="e", status="diverged", step=9, reason="eval_loss above the bound", metrics=dict(ppl=1.5))
    rd.write_results(r)
    assert rd.results() == r and [p.name for p in rd.path.iterdir()] == ["results.json"]
    with pytest.raises(TypeError, match="write_results takes a Results, not dict"): rd.write_results(r.to_dict())

def test_a_failed_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "s" / "e")
    old = Results(study="s", experiment="e", status="failed", reason="cell 3: RuntimeError: out of memory")
    rd.write_results(old)
    before = rd.results_file.read_bytes()
    def no_rename(src, dst): raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        rd.write_results(Results(study="s", experiment="e", status="complete", step=6, metrics=dict(ppl=1.5)))
    monkeypatch.undo()
    assert rd.results_file.read_bytes() == before and rd.results() == old             # a reader sees the old file, whole
    assert [p.name for p in rd.path.iterdir()] == ["results.json"]                    # and no temp file is left
    with pytest.raises(TypeError): rd.write_results(Results(study="s", experiment="e", metrics=dict(x=object())))   # not JSON
    assert rd.results_file.read_bytes() == before and [p.name for p in rd.path.iterdir()] == ["results.json"]

def test_a_finished_result_removes_the_hand_off_a_failed_one_keeps_it(tmp_path):
    rd = RunDir(tmp_path / "s" / "e")
    rd.write_training(dict(status="complete", step=6, curves=dict(train=[], val=[])))
    rd.write_results(Results(study="s", experiment="e", reason="cell 4: RuntimeError: out of memory"))
    assert rd.read_training()["step"] == 6 and rd.trained_step() == 6   # a re-run evaluates, it does not train again
    rd.write_results(Results(study="s", experiment="e", status="complete", step=6))
    assert rd.read_training() is None and rd.trained_step() == 6 and sorted(p.name for p in rd.path.iterdir()) == ["results.json"]

def test_a_file_of_another_schema_is_named(tmp_path):
    rd = RunDir(tmp_path / "s" / "e"); write_json(rd.results_file, dict(_stored(), schema=3))
    with pytest.raises(ValueError, match=rf"{rd.results_file}: results schema 3"): rd.results()

# ---- clear and lock

def test_clear_refuses_a_directory_that_is_not_a_run(tmp_path):
    home = tmp_path / "home"; home.mkdir(); (home / "thesis.tex").write_text("x"); (home / "figures").mkdir()
    with pytest.raises(ValueError, match=rf"{home} does not look like a run directory.*not deleting anything") as e: RunDir(home).clear()
    _one_line(e)
    assert sorted(p.name for p in home.iterdir()) == ["figures", "thesis.tex"]
    RunDir(tmp_path / "absent").clear()                  # nothing there: nothing to do
    assert not (tmp_path / "absent").exists()
    run = tmp_path / "run"; (run / "checkpoint-4").mkdir(parents=True); (run / "notes.txt").write_text("x")
    RunDir(run).clear()                                  # a checkpoint marks a run directory
    assert not any(run.iterdir())

LOCKER = "import sys, time\nfrom quantstudy.rundir import RunDir\nwith RunDir(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)"

def test_lock_is_exclusive_across_processes(tmp_path):
    rd = RunDir(tmp_path / "s" / "e")
    p = subprocess.Popen([sys.executable, "-c", LOCKER, str(rd.path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(quantstudy.__file__).parents[1])})
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=rf"{rd.path} is in use by pid {p.pid} on .*one writer per run directory") as e:
            with rd.lock(): pass
        _one_line(e)
        assert isinstance(e.value, ValueError)          # the CLI's one-line error path
    finally: p.kill(); p.wait()
    with rd.lock():                                     # the lock died with its process
        assert (rd / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunInUse):                   # a second holder in this process is refused as well
            with RunDir(rd.path).lock(): pass

# ---- record_run: one configuration per run directory

def test_record_run_refuses_another_configuration_and_rewrites_nothing_for_the_same(tmp_path):
    rd = runner.run_dir("t", "w8a8", tmp_path)
    runner.record_run(rd, get_experiment("w8a8"), "t", "smoke", {})
    stamp, text = rd.run_file.stat().st_mtime_ns, rd.run_file.read_text()
    runner.record_run(rd, get_experiment("w8a8"), "t", "smoke", {})
    assert rd.run_file.stat().st_mtime_ns == stamp and rd.run_file.read_text() == text            # the same: untouched
    with pytest.raises(ValueError, match=r"another configuration \(train.model.n_layer: 4 -> 6\): pass --force") as e:
        runner.record_run(rd, get_experiment("w8a8", model={"n_layer": 6}), "t", "smoke", {"model": {"n_layer": 6}})
    _one_line(e)
    with pytest.raises(ValueError, match=r"recipe.linear.act.bits: 8 -> 4"):
        runner.record_run(rd, dataclasses.replace(get_experiment("w8a8"), recipe=Recipe(linear=LinearQuant(weight="8-channel", act="4-token"))),
                          "t", "smoke", {})
    assert rd.run_file.read_text() == text                                                        # refused: untouched
    runner.record_run(rd, get_experiment("w8a8"), "t", "smoke", {}, nproc=2)   # the same run on 2 processes: recorded
    assert rd.read_run()["nproc"] == 2 and rd.read_run()["hash"] == json.loads(text)["hash"]

# ---- the template: package data, one parameter

def test_the_template_ships_inside_the_package():
    package = Path(quantstudy.__file__).resolve().parent
    assert runner.TEMPLATE.is_file() and package in runner.TEMPLATE.resolve().parents
    nb = json.loads(runner.TEMPLATE.read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "".join(params[0]["source"]).split("=")[0].strip() == "run_json"

def test_the_template_without_run_json_says_what_to_pass(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(runner.TEMPLATE), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False)
    assert e.value.ename == "ValueError"
    assert e.value.evalue.startswith("run_json=None: pass the path of a run directory's run.json")
    assert not any(p.name.endswith(".json") for p in tmp_path.iterdir())   # it stopped before any work

NO_FASTCORE = """
import sys, tempfile
class Hide:   # fastcore looks uninstalled, as on the GPU image
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fastcore": raise ImportError("no fastcore")
sys.meta_path.insert(0, Hide())
from quantstudy.rundir import Results, RunDir
rd = RunDir(tempfile.mkdtemp())
with rd.lock():
    rd.write_run("s", "e", dict(train={}, recipe=None)); rd.write_results(Results(study="s", experiment="e", status="complete", step=3))
print(rd.read_run()["study"], rd.results().status.value, rd.trained_step(), sorted(rd.checkpoint_dirs()), "fastcore" in sys.modules)
"""

def test_the_run_directory_works_without_fastcore():
    "The trainer imports rundir on the GPU image, which has no fastcore: its methods are attached all the same."
    r = subprocess.run([sys.executable, "-c", NO_FASTCORE], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(quantstudy.__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["s", "complete", "3", "[]", "False"]
