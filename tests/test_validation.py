"Bad input fails up front in one line; state (checkpoints, token caches, run directories) is checked before it is trusted."
import json, math, os, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch
from quantstudy.train import resume_checkpoint
from quantstudy.config import TrainConfig, preset
from quantstudy.rundir import Results, RunDir, RunInUse, checkpoint_problem, config_hash
from quantstudy.host import git_commit
from quantstudy.experiments import get_experiment
from quantstudy.data import cache_problem, check_corpus, load_corpus, load_tokenizer, tokenize_corpus
from quantstudy.runner import check_name, inside, record_run, run_dir, run_experiment

needs_data = pytest.mark.usefixtures("data_dir")   # conftest: skipped without a data root


# ---- TrainConfig: every field's type and range, one line naming field, value and what is allowed

BAD_FIELDS = [  # (overrides, the message must match)
    (dict(lr="abc"), r"lr='abc': must be a finite number > 0"),
    (dict(lr=float("nan")), r"lr=nan"), (dict(lr=0), r"lr=0"), (dict(lr=True), r"lr=True"),
    (dict(dropout=2.0), r"dropout=2.0: must be a number in \[0, 1\)"), (dict(dropout=-0.1), r"dropout=-0.1"),
    (dict(betas=(0.9,)), r"betas=\(0.9,\): must be two numbers"), (dict(betas=(0.9, 1.0)), r"betas=\(0.9, 1.0\)"),
    (dict(betas="0.9"), r"betas='0.9'"),
    (dict(max_steps=True), r"max_steps=True: must be a positive int"), (dict(max_steps=2.5), r"max_steps=2.5"),
    (dict(warmup_steps=-1), r"warmup_steps=-1: must be an int >= 0"), (dict(eps=0.0), r"eps=0.0"),
    (dict(weight_decay=float("inf")), r"weight_decay=inf"), (dict(grad_clip=-1), r"grad_clip=-1"),
    (dict(seed=-3), r"seed=-3"), (dict(eos="yes"), r"eos='yes': must be true or false"),
    (dict(eval_blocks=0), r"eval_blocks=0"), (dict(save_total_limit=0), r"save_total_limit=0"),
    (dict(micro_batch_size=True), r"micro_batch_size=True"), (dict(precision="fp16"), r"precision='fp16'"),
    (dict(diverge_patience=0), r"diverge_patience=0"), (dict(diverge_loss=-1.0), r"diverge_loss=-1.0"),
    (dict(max_train_tokens=0), r"max_train_tokens=0"), (dict(max_train_tokens=10), r"max_train_tokens=10: must be at least block_size=64"), (dict(corpus=""), r"corpus=''"), (dict(data_dir=3), r"data_dir=3"),
    (dict(size="huge"), r"size='huge': must be one of \('tiny'"),
    (dict(model=3), r"model=3: must be a dict"),
    (dict(model=dict(n_layer=0)), r"model.n_layer=0: must be a positive int"),
    (dict(model=dict(n_layer=True)), r"model.n_layer=True"),
    (dict(model=dict(n_head=3)), r"model.n_head=3 \(with n_embd=128.*heads must divide the width"),
    (dict(model=dict(n_embd=90)), r"model.n_head=4 \(with n_embd=90"),
    (dict(model=dict(n_layers=6)), r"model.n_layers=6: unknown GPT2Config field"),
    (dict(model=dict(n_positions=64)), r"model.n_positions=64: set by TrainConfig, use block_size"),
    (dict(model=dict(resid_pdrop=0.0)), r"use dropout instead"),
    (dict(model=dict(activation_function="nope")), r"model.activation_function='nope': must be one of"),
    (dict(model=dict(layer_norm_epsilon="x")), r"model.layer_norm_epsilon='x'"),
    (dict(model=dict(attn_implementation="fast")), r"model.attn_implementation='fast'"),
]

@pytest.mark.parametrize("bad,match", BAD_FIELDS, ids=[str(b) for b, _ in BAD_FIELDS])
def test_train_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match) as e: get_experiment("a4-tensor", "smoke", **bad)
    assert "\n" not in str(e.value)

def test_good_configs_pass_and_nested_overrides_merge():
    assert preset("smoke", warmup_steps=0, grad_clip=0, eval_blocks=None, max_steps=2).max_steps == 2   # warmup > max_steps is fine
    assert TrainConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95) and TrainConfig(lr=1).lr == 1
    # the README's `-o model.n_layer=6` keeps the smoke preset's width and heads
    assert get_experiment("w8a8", model={"n_layer": 6}).train.model == {"n_layer": 6, "n_head": 4, "n_embd": 128}
    assert get_experiment("w8a8", model={"n_head": 8}).train.model == {"n_layer": 4, "n_head": 8, "n_embd": 128}

BAD_EVALS = [
    (dict(evals={"ppl": {}}), r"evals.ppl: unknown evaluation"),
    (dict(evals={"perplexity": {"corpora": "ptb"}}), r"evals.perplexity.corpora='ptb'"),
    (dict(evals={"perplexity": {"corpora": ["ptb"], "max_tokens": 0}}), r"evals.perplexity.max_tokens=0"),
    (dict(evals={"lambada": {"limt": 4}}), r"evals.lambada: unknown fields \['limt'\]"),
    (dict(evals={"downstream": {"tasks": ["arc_easy"], "seeds": []}}), r"evals.downstream.seeds=\[\]"),
    (dict(evals=["ptb"]), r"evals=\['ptb'\]: must be a dict"),
    (dict(analyses=["sharpnes"]), r"analyses=\['sharpnes'\]"), (dict(analyses="sharpness"), r"analyses='sharpness'"),
]

@pytest.mark.parametrize("kw,match", BAD_EVALS, ids=[str(k) for k, _ in BAD_EVALS])
def test_evals_and_analyses_are_checked(kw, match):
    with pytest.raises(ValueError, match=match): get_experiment("w8a8", "smoke", **kw)

# ---- corpora and splits: every one the run reads, training and evaluations, before a kernel starts

def _data_root_without(data_dir, tmp_path, *missing) -> Path:
    "A data root of links to the shared one, less `missing` top-level entries."
    root = tmp_path / "data"; root.mkdir()
    for p in data_dir.iterdir():
        if p.name not in missing: (root / p.name).symlink_to(p)
    return root

@needs_data
@pytest.mark.parametrize("overrides,missing,match", [
    (dict(corpus="nope"), (), "unknown corpus 'nope'"),
    (dict(val_split="heldout"), (), "ptb has no split 'heldout'"),
    (dict(train_split="valid"), (), "val_split='valid' is the training split"),   # validating on the training text
    (dict(corpus="wikitext2"), (), "wikitext2 train: no file at"),               # not in shared/data
    (dict(data_dir="/nonexistent/data"), (), "data root /nonexistent/data"),
    ({}, ("lambada",), "lambada test: no file at"),                               # an evaluation's corpus, found before training
    ({}, ("tokenizer",), "no GPT-2 tokenizer under"),
    ({}, ("1bw",), "lm1b test: no file at"),
])
def test_inputs_are_checked_before_anything_runs(data_dir, tmp_path, monkeypatch, overrides, missing, match):
    if missing: monkeypatch.setenv("QUANTSTUDY_DATA", str(_data_root_without(data_dir, tmp_path, *missing)))
    root = tmp_path / "runs"
    with pytest.raises((ValueError, FileNotFoundError), match=match): run_experiment("a4-tensor", "t", overrides=overrides, runs_root=root)
    assert not root.exists()

def test_missing_data_root_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSTUDY_DATA", str(tmp_path / "no-data"))
    with pytest.raises(FileNotFoundError, match=r"no-data \(from \$QUANTSTUDY_DATA\) is not a directory"):
        run_experiment("a4-tensor", "t", runs_root=tmp_path / "runs")

@needs_data
def test_ptq_needs_its_base_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `quantstudy run baseline --study t` first"):
        run_experiment("ptq-w4-tensor", "t", runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()

def test_a_single_file_corpus_cannot_be_trained_on(tmp_path):
    f = tmp_path / "notes.txt"; f.write_text("one\n\ntwo\n")
    for split in ("train", "valid"):
        with pytest.raises(ValueError, match=f"corpus {f} is a single file.*cannot be the (train|validation) split"):
            load_corpus(f, split)
    assert check_corpus(f, "test") == [f]            # one text to evaluate on is fine
    (tmp_path / "d").mkdir(); t = tmp_path / "d" / "train.txt"; t.write_text("x\n\ny\n")
    assert check_corpus(t, "train") == [t]
    with pytest.raises(ValueError, match="its name says train"): check_corpus(t, "validation")

def test_a_non_utf8_corpus_names_its_path(tmp_path):
    (tmp_path / "train.txt").write_bytes("caf\xe9 au lait\n".encode("latin1"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'train.txt'} is not UTF-8 text \\(byte 3"): load_corpus(tmp_path, "train")

# ---- token caches: size checked against the sidecar, a bad one rebuilt atomically and said so

@needs_data
@pytest.mark.parametrize("damage,said", [
    (lambda bin, side: os.truncate(bin, 1000), "it has 1000 bytes"),
    (lambda bin, side: side.unlink(), "sidecar .* is missing"),
    (lambda bin, side: side.write_text("{not json"), "sidecar .* does not load"),
    (lambda bin, side: bin.write_bytes(bin.read_bytes() + b"\0\0"), "records"),
])
def test_a_damaged_token_cache_is_rebuilt(data_dir, tmp_path, capsys, damage, said):
    tok = load_tokenizer(data_dir)
    (tmp_path / "c").mkdir(); (tmp_path / "c" / "train.txt").write_text("the quick brown fox jumps\n\n" * 200)
    ids = tokenize_corpus(tmp_path / "c", "train", tok, cache_dir=tmp_path / "cache")
    n, path = len(ids), Path(ids.filename); del ids
    damage(path, path.with_suffix(".json"))
    assert cache_problem(path) is not None
    again = tokenize_corpus(tmp_path / "c", "train", tok, cache_dir=tmp_path / "cache")
    assert len(again) == n and cache_problem(path) is None
    err = capsys.readouterr().err
    assert f"token cache {path}" in err and "rebuilding" in err
    import re; assert re.search(said, err), err
    assert not list((tmp_path / "cache").glob("*.tmp"))

# ---- checkpoints: complete = every file present and loadable; resume takes the newest complete one

def _checkpoint(d: Path, step: int) -> Path:
    "A checkpoint directory with the files the Trainer writes (tiny contents), as the Trainer would load them."
    from safetensors.torch import save_file
    c = d / f"checkpoint-{step}"; c.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(c / "model.safetensors"))
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, c / "optimizer.pt")
    torch.save({"last_epoch": step, "_step_count": step + 1}, c / "scheduler.pt")
    torch.save({"python": None, "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, c / "rng_state.pth")
    (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (c / "config.json").write_text("{}")
    return c

DAMAGE = [  # (file, how) -> the reason must name the file
    ("optimizer.pt", "missing"), ("scheduler.pt", "missing"), ("model.safetensors", "missing"), ("rng_state.pth", "missing"),
    ("trainer_state.json", "missing"), ("config.json", "missing"),
    ("optimizer.pt", "garbage"), ("scheduler.pt", "garbage"), ("model.safetensors", "garbage"), ("rng_state.pth", "garbage"),
    ("trainer_state.json", "garbage"), ("optimizer.pt", "truncated"), ("model.safetensors", "truncated"),
]

@pytest.mark.parametrize("name,how", DAMAGE, ids=[f"{n}-{h}" for n, h in DAMAGE])
def test_an_incomplete_checkpoint_is_skipped_named_and_removed(tmp_path, name, how):
    good, bad = _checkpoint(tmp_path, 100), _checkpoint(tmp_path, 200)
    assert checkpoint_problem(good) is None and sorted(RunDir(tmp_path).checkpoints()) == [100, 200]
    f = bad / name
    if how == "missing": f.unlink()
    elif how == "garbage": f.write_bytes(b"garbage \x00\xff" * 10)
    else: os.truncate(f, f.stat().st_size // 2)
    why = checkpoint_problem(bad)
    assert why and why.startswith(name) and ("missing" in why if how == "missing" else "does not load" in why)
    assert sorted(RunDir(tmp_path).checkpoints()) == [100] and RunDir(tmp_path).last_checkpoint() == good
    assert sorted(RunDir(tmp_path).checkpoint_dirs()) == [100, 200]   # the incomplete one is still listed as a directory
    said = []
    assert resume_checkpoint(tmp_path, log=said.append) == good
    assert said == [f"resume: skipping checkpoint-200, incomplete ({why}); removed", "resume: from checkpoint-100"]
    assert not bad.exists() and good.exists()

def test_resume_with_no_complete_checkpoint_starts_fresh(tmp_path):
    (tmp_path / "checkpoint-50").mkdir(); (tmp_path / "checkpoint-x").mkdir()   # cut short; not a checkpoint name
    said = []
    assert resume_checkpoint(tmp_path, log=said.append) is None and not (tmp_path / "checkpoint-50").exists()
    assert said == ["resume: skipping checkpoint-50, incomplete (trainer_state.json is missing); removed"]
    _checkpoint(tmp_path, 10)
    assert resume_checkpoint(tmp_path, resume=False, log=said.append) is None   # no resume: nothing chosen

# ---- a run directory: names, containment, configuration hash, one writer

BAD_NAMES = ["../../victim", "..", ".", ".hidden", "/tmp/abs", "a/b", "a b", "", "x" * 101, "semi;colon", "tab\t", None]

@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_unsafe_study_and_experiment_names(tmp_path, name):
    with pytest.raises(ValueError, match="study name"): run_dir(name, "w8a8", tmp_path)
    with pytest.raises(ValueError, match="experiment name"): run_dir("smoke", name, tmp_path)
    with pytest.raises(ValueError, match="study name"): run_experiment("w8a8", name, runs_root=tmp_path / "runs", force=True)
    assert not (tmp_path / "runs").exists()

def test_study_name_cannot_delete_outside_the_runs_root(tmp_path):
    victim = tmp_path / "victim"; victim.mkdir(); (victim / "a4-tensor").mkdir(); (victim / "a4-tensor" / "keep.txt").write_text("x")
    root = tmp_path / "a" / "runs"
    with pytest.raises(ValueError, match="study name '../../victim'"):
        run_experiment("a4-tensor", "../../victim", runs_root=root, force=True)
    assert (victim / "a4-tensor" / "keep.txt").exists()

def test_a_symlink_out_of_the_runs_root_is_refused(tmp_path):
    (tmp_path / "runs").mkdir(); (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "smoke").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the root"): run_dir("smoke", "w8a8", tmp_path / "runs")
    assert inside(tmp_path / "runs" / "x" / "y", tmp_path / "runs") == (tmp_path / "runs" / "x" / "y").resolve()

def test_clear_run_dir_keeps_its_lock_and_refuses_other_folders(tmp_path):
    rd = run_dir("s", "e", tmp_path / "runs"); (rd / "checkpoint-5").mkdir(parents=True); (rd / "results.json").write_text("{}")
    (tmp_path / "outside.txt").write_text("x"); (rd / "link").symlink_to(tmp_path / "outside.txt")
    with rd.lock(): rd.clear()
    assert [p.name for p in rd.path.iterdir()] == [".lock"] and (tmp_path / "outside.txt").exists()
    home = tmp_path / "home"; home.mkdir(); (home / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="does not look like a run directory"): RunDir(home).clear()
    with pytest.raises(ValueError, match="outside the root"): inside(home, tmp_path / "runs")   # what run_dir checks
    assert (home / "thesis.tex").exists()

def test_config_hash_is_stored_and_a_change_is_an_error(tmp_path):
    rd = RunDir(tmp_path / "r")
    exp = get_experiment("w8a8")
    record_run(rd, exp, "t", "smoke", {})
    stored = rd.read_run()
    assert stored["hash"] == config_hash(exp.to_dict()) and len(stored["hash"]) == 16
    assert stored["config"] == json.loads(json.dumps(exp.to_dict())) and stored["study"] == "t" and stored["experiment"] == "w8a8"
    assert config_hash(json.loads(json.dumps(exp.to_dict()))) == stored["hash"]   # through JSON (tuples -> lists): the same hash
    with pytest.raises(ValueError, match=r"another configuration \(train.lr: 0.002 -> 0.05\).*--force"):
        record_run(rd, get_experiment("w8a8", lr=0.05), "t", "smoke", {"lr": 0.05})
    assert rd.read_run() == stored                  # refused: nothing rewritten
    record_run(rd, get_experiment("w8a8", lr=0.05), "t", "smoke", {"lr": 0.05}, force=True)
    assert rd.read_run()["config"]["train"]["lr"] == 0.05 and rd.read_run()["overrides"] == {"lr": 0.05}

def _finished(root, study, name, **overrides) -> Results:
    "A finished run directory as an older runner left it: results.json with its config, no run.json; its `Results`, as read back."
    exp = get_experiment(name, **overrides)
    rd = RunDir(root / study / name)
    rd.write_results(Results(study=study, experiment=name, status="complete", step=6, config=dict(**exp.to_dict(), overrides=overrides)))
    return rd.results()

@needs_data
def test_a_finished_run_asked_with_another_config_is_an_error(tmp_path):
    r = _finished(tmp_path, "t", "w8a8", max_steps=6)
    assert run_experiment("w8a8", "t", overrides={"max_steps": 6}, runs_root=tmp_path) == r   # same config: the old result
    run = RunDir(tmp_path / "t" / "w8a8").read_run()                                            # now recorded
    assert run["config"] == {k: v for k, v in r.config.items() if k != "overrides"} and run["overrides"] == {"max_steps": 6}
    with pytest.raises(ValueError, match=r"train.lr: 0.002 -> 0.05"):
        run_experiment("w8a8", "t", overrides={"max_steps": 6, "lr": 0.05}, runs_root=tmp_path)
    with pytest.raises(ValueError, match=r"train.max_steps: 6 -> 300"): run_experiment("w8a8", "t", runs_root=tmp_path)

@needs_data
def test_one_writer_per_run_directory(tmp_path):
    _finished(tmp_path, "t", "w8a8")
    d = tmp_path / "t" / "w8a8"
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242 on elsewhere'); f.flush(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(d / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=r"in use by pid 4242 on elsewhere: one writer per run directory"):
            run_experiment("w8a8", "t", runs_root=tmp_path)
        with pytest.raises(RunInUse): run_experiment("w8a8", "t", runs_root=tmp_path, force=True)
        assert RunDir(d).results().status == "complete"                    # nothing cleared under the other writer
    finally: p.kill(); p.wait()
    assert run_experiment("w8a8", "t", runs_root=tmp_path).status == "complete"   # the lock died with its process

@needs_data
@pytest.mark.parametrize("text", ["{\"status\": \"compl", "", "[1, 2]"])
def test_a_corrupt_results_json_is_named(tmp_path, text):
    d = tmp_path / "t" / "w8a8"; d.mkdir(parents=True); (d / "results.json").write_text(text)
    with pytest.raises(ValueError, match=f"{d / 'results.json'} (does not load|is not a JSON object).*--force"):
        run_experiment("w8a8", "t", runs_root=tmp_path)

def test_git_is_silent_outside_a_checkout(tmp_path, capfd):
    assert git_commit(tmp_path) is None
    assert "fatal" not in capfd.readouterr().err

# ---- the template is executed with its output streamed, under the lock, with the configuration recorded

FAKE_TEMPLATE = {"cells": [
    {"cell_type": "code", "id": "p", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [], "source": "run_json = None"},
    {"cell_type": "code", "id": "b", "metadata": {}, "execution_count": None, "outputs": [], "source":
     "import pathlib, sys\nfrom quantstudy.rundir import Results, RunDir\n"
     "print('training step 1 of 2', flush=True); print('to stderr', file=sys.stderr, flush=True)\n"
     "rd = RunDir(pathlib.Path(run_json).parent); run = rd.read_run()\n"
     "assert (rd / '.lock').exists() and not (rd / 'checkpoint-3').exists()   # under the lock, cleared before it runs\n"
     "rd.write_results(Results(study=run['study'], experiment=run['experiment'], status='complete', step=2, "
     "config=dict(lr=run['config']['train']['lr'])))"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}

@needs_data
def test_run_streams_progress_and_force_clears_under_the_lock(tmp_path, capfd):
    tpl = tmp_path / "fake.ipynb"; tpl.write_text(json.dumps(FAKE_TEMPLATE))
    root = tmp_path / "runs"
    d = root / "t" / "w8a8"; (d / "checkpoint-3").mkdir(parents=True)
    record_run(RunDir(d), get_experiment("w8a8", lr=0.05), "t", "smoke", {"lr": 0.05})   # a run of another configuration is there
    r = run_experiment("w8a8", "t", runs_root=root, template=tpl, progress=True, force=True)
    assert r == Results(study="t", experiment="w8a8", status="complete", step=2, config=dict(lr=0.002))   # the new run.json, seen by the kernel
    assert not (d / "checkpoint-3").exists() and RunDir(d).read_run()["config"]["train"]["lr"] == 0.002
    out = capfd.readouterr()
    assert "training step 1 of 2" in out.out and "to stderr" in out.err

def test_without_a_data_root_hub_names_and_splits_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTSTUDY_DATA")
    with pytest.raises(ValueError, match="lm1b has no 'validation' split on the hub"):
        run_experiment("a4-tensor", "t", overrides=dict(corpus="lm1b"), runs_root=tmp_path / "runs")
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        run_experiment("a4-tensor", "t", overrides=dict(corpus="nope"), runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
