"`benchmarks/gpu_check.py --tiny` on the CPU (so the GPU check never rots), with the packages a bare GPU image lacks blocked."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LACKS = ("datasets", "papermill", "lm_eval", "fastcore", "matplotlib")   # the GPU machine's image has none of these
HEAVY = IMAGE_LACKS + ("tensorboard",)   # and no GPU-facing module may import these at module level

def hide(names) -> str:
    "Python source that makes `names` look uninstalled: their specs are never found, so `import` raises ImportError."
    return textwrap.dedent(f"""
        import sys
        HIDDEN = {tuple(names)!r}
        class Hide:
            def __init__(self, finders): self.finders = finders
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN: return None
                for f in self.finders:
                    spec = f.find_spec(name, path, target) if hasattr(f, "find_spec") else None
                    if spec is not None: return spec
            def find_distributions(self, context=None):   # importlib.metadata: hidden packages have no metadata either
                import importlib.metadata as md
                context = context or md.DistributionFinder.Context()
                if (context.name or "").replace("-", "_").lower() in HIDDEN: return
                for f in self.finders:
                    if hasattr(f, "find_distributions"): yield from f.find_distributions(context)
            def invalidate_caches(self):
                for f in self.finders:
                    if hasattr(f, "invalidate_caches"): f.invalidate_caches()
        sys.meta_path[:] = [Hide(list(sys.meta_path))]
        """)

def python(code: str, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

def test_hiding_works():
    r = python(hide(["json"]) + "\ntry: import json\nexcept ImportError: print('hidden')")
    assert r.stdout.strip() == "hidden", r.stderr

def test_gpu_facing_modules_import_without_heavy_packages():
    mods = ["quantstudy.quantizers", "quantstudy.fused", "quantstudy.qlinear", "quantstudy.model", "quantstudy.optim", "quantstudy.train",
            "quantstudy.data", "quantstudy.analysis"]
    code = hide(HEAVY) + "\nimport importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods) + textwrap.dedent(f"""
        sys.path.insert(0, "benchmarks")
        import gpu_check, _loops, int8, trainer_overhead
        loaded = sorted(set(HIDDEN) & {{m.split(".")[0] for m in sys.modules}})
        print("loaded:", loaded)
        """)
    r = python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout

# benchmarks/gpu_check.py as `python benchmarks/gpu_check.py ARGS` runs it, in a process without the GPU image's missing packages
LAUNCH = hide(IMAGE_LACKS) + textwrap.dedent("""
    import runpy
    sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
    """)

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "One `--tiny` run, in a process where the GPU image's missing packages are hidden."
    out = tmp_path_factory.mktemp("gpu_check")
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    r = python(LAUNCH, str(out), "--tiny")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r, json.loads((out / "gpu_check.json").read_text()), before

STAGES = ["correctness", "training", "throughput", "compiled", "int8", "optimizer", "memory", "linear_time", "ddp"]

def test_tiny_runs_every_stage(tiny_run):
    r, doc, _ = tiny_run
    assert doc["tiny"] is True and doc["device"].startswith("CPU") and doc["torch"]
    assert list(doc["stages"]) == STAGES and all(s["status"] == "done" for s in doc["stages"].values()), doc["stages"]
    lines = [l for l in r.stdout.splitlines() if l.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == len(doc["checks"]) >= 40   # one printed line per recorded check
    for s in STAGES: assert f"---- stage {s}: done in " in r.stdout and "(budget 240 s)" in r.stdout   # each stage's time and budget
    assert "| stage | status | seconds | budget |" in r.stdout
    assert all(c["status"] in ("PASS", "FAIL", "SKIP") and c["figure"] for c in doc["checks"])

def test_tiny_correctness_passes(tiny_run):
    "On one device the compiled, eager and reference paths must agree exactly: any FAIL here is a bug."
    _, doc, _ = tiny_run
    names = [c["name"] for c in doc["checks"]]
    for prefix in ("fake_quantize compiled", "QuantLinear w8a8g8 int8 float32", "QuantLinear w4a4g4 tensor bfloat16",
                   "_int_mm exact", "LinearQuant(kernel='int8')", "QAdamW m8-channel_v8-channel", "QAdamW m4-block128-dynamic",
                   "attention sdpa vs eager", "training m4v4-li", "train() / plain loop", "MFU baseline compiled", "step time w8a8g8",
                   "int8 small", "optimizer QAdamW m8v8", "peak memory", "linear time share", "ddp one-process gloo"):
        assert any(n.startswith(prefix) for n in names), prefix
    correctness = [c for c in doc["checks"] if c["name"].startswith(("fake_quantize", "QuantLinear", "_int_mm", "LinearQuant", "QAdamW", "attention"))]
    assert [c["name"] for c in correctness if c["status"] == "FAIL"] == []
    assert [c["name"] for c in doc["checks"] if c["status"] == "FAIL"] == []   # nor anywhere else on a CPU
    assert any(c["status"] == "SKIP" and "flash" in c["name"] for c in doc["checks"])   # no flash-attn on a CPU

def test_tiny_figures_are_sane(tiny_run):
    _, doc, _ = tiny_run
    by = {c["name"]: c for c in doc["checks"]}
    tput = by["train() / plain loop, baseline eager"]
    assert tput["train_tokens_per_s"] > 0 and tput["plain_tokens_per_s"] > 0
    base = by["training baseline"]
    assert len(base["losses"]) == 8 and all(l == l for l in base["losses"])   # one loss per step, no NaN
    mem = next(c for c in doc["checks"] if c["name"].startswith("peak memory"))
    assert mem["peak_bytes"] >= mem["accounting"]["parameters"] > 0
    opt = by["optimizer QAdamW m8v8"]
    assert 0 < opt["state_ratio"] < 0.5   # 8-bit m and v: about a quarter of AdamW's fp32 state
    assert opt["state_ratio"] == opt["state_bytes"] / by["optimizer AdamW(fused=True)"]["state_bytes"] and opt["buffer_bytes"] > 0
    ddp = by["ddp one-process gloo"]
    assert ddp["backend"] == "gloo" and ddp["moved"] and ddp["grads_finite"]

def test_tiny_never_writes_results_md(tiny_run):
    _, _, before = tiny_run
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before

def test_bad_arguments_fail_fast():
    gc = _gpu_check_module()
    for args, msg in ((["x", "--only", "nope"], "unknown stages"), (["x", "--budget", "int8=soon"], "STAGE=SECONDS"),
                      ([], "give the folder")):
        with pytest.raises(SystemExit) as e: gc.main(args)
        assert e.value.code != 0
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"): gc.main(["x"])

def _gpu_check_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    return gpu_check

def test_results_md_only_from_cuda_runs(tiny_run, tmp_path, monkeypatch):
    gc = _gpu_check_module()
    import _common
    _, doc, _ = tiny_run
    tiny_json = tmp_path / "tiny.json"; tiny_json.write_text(json.dumps(doc))
    results = tmp_path / "RESULTS.md"; results.write_text("# r\n\n<!-- begin gpu_check:gpu -->\nnot measured (no GPU)\n<!-- end gpu_check:gpu -->\n")
    monkeypatch.setattr(_common, "RESULTS", results)
    with pytest.raises(SystemExit, match="not from a CUDA run"): gc.main(["--from-json", str(tiny_json)])
    assert "not measured (no GPU)" in results.read_text()
    # a CUDA run, then a rerun of one stage: the rerun's checks replace that stage's, the others stay
    run1 = dict(doc, tiny=False, cuda="13.0", device="NVIDIA H200")
    run2 = dict(run1, stages={"int8": doc["stages"]["int8"]},
                checks=[dict(c, figure="rerun " + c["figure"]) for c in doc["checks"] if c["stage"] == "int8"])
    paths = []
    for i, d in enumerate((run1, run2)):
        paths.append(tmp_path / f"run{i}.json"); paths[-1].write_text(json.dumps(d))
    gc.main(["--from-json", *map(str, paths)])
    text = results.read_text()
    assert "not measured (no GPU)" not in text and "NVIDIA H200" in text and "| goal | target | measured |" in text
    int8_lines = [l for l in text.splitlines() if "| int8 small" in l]
    assert int8_lines and all("rerun" in l for l in int8_lines)
    assert sum("| fake_quantize compiled" in l for l in text.splitlines()) == sum(c["name"].startswith("fake_quantize") for c in doc["checks"])

def test_train_cli_without_fastcore_says_what_it_needs():
    "Without fastcore the library imports (above); its command line names the missing package instead of doing nothing."
    r = python(hide(["fastcore"]) + "\nimport runpy; runpy.run_module('quantstudy.train', run_name='__main__')")
    assert r.returncode != 0 and "needs fastcore" in r.stderr, r.stderr[-2000:]

def test_dry_run_builds_the_full_settings_and_every_stage(tmp_path):
    "`--dry-run`: the full-size settings of the GPU run built and every stage constructed (models on the meta device), nothing run."
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    r = python(LAUNCH, str(tmp_path), "--dry-run")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry"] is True and doc["tiny"] is False
    assert list(doc["stages"]) == STAGES and all(s["status"] == "planned" for s in doc["stages"].values()), doc["stages"]
    plans = {c["stage"]: c["figure"] for c in doc["checks"] if c["status"] == "PLAN"}
    assert [c["name"] for c in doc["checks"] if c["status"] == "PLAN"] == [f"stage {s}" for s in STAGES]
    assert [c for c in doc["checks"] if c["status"] not in ("PLAN", "PASS")] == []
    assert "small, medium, large, xl" in plans["linear_time"] and "124,439,808" in plans["training"] and "8192 tokens" in plans["int8"]
    assert "= 450 s" in r.stdout and (ROOT / "benchmarks" / "RESULTS.md").read_text() == before
    gc = _gpu_check_module()
    with pytest.raises(SystemExit, match="not from a CUDA run"): gc.merged([tmp_path / "gpu_check.json"])

def _synthetic_run(**over) -> dict:
    "A gpu_check.json as a CUDA run writes it, made up: two stages, a goal figure of each kind."
    checks = [dict(status="PASS", name="MFU baseline compiled train() (inductor)", figure="47.0% of 989 TFLOP/s", stage="compiled"),
              dict(status="PASS", name="train() / plain loop, baseline eager", figure="0.981 (1 vs 1 tokens/s; goal >= 0.9)", stage="throughput"),
              dict(status="FAIL", name="step time w8a8g8 / baseline, eager model", figure="1.210 | odd", stage="throughput"),
              dict(status="PASS", name="int8 medium c_fc 1024->4096", figure="int8 / base: forward 0.71", stage="int8",
                   row=["medium c_fc 1024->4096", "1.00", 1.2, 0.71, "2.00", 1.1, 0.9, 0.5]),
              dict(status="PASS", name="int8 compiled code", figure="the extern _int_mm (cuBLAS on CUDA), then 1 kernel(s)", stage="int8")]
    doc = dict(tiny=False, dry=False, device="NVIDIA H200", torch="2.11.0+cu130", cuda="13.0", cudnn=91000, transformers="5.17.0",
               python="3.12.3", date="2026-12-05T10:00:00", host="gpu", checks=checks, seconds=400.0,
               stages=dict(throughput=dict(status="done", seconds=50.0, budget=60), compiled=dict(status="done", seconds=98.5, budget=110),
                           int8=dict(status="done", seconds=20.0, budget=35)))
    doc.update(over)
    return doc

def test_from_json_writes_results_md_from_a_synthetic_cuda_run(tmp_path, monkeypatch):
    gc = _gpu_check_module()
    import _common
    results = tmp_path / "RESULTS.md"
    results.write_text("# r\n\n<!-- begin gpu_check:gpu -->\nnot measured (no GPU)\n<!-- end gpu_check:gpu -->\n\ntail\n")
    monkeypatch.setattr(_common, "RESULTS", results)
    run1 = tmp_path / "a.json"; run1.write_text(json.dumps(_synthetic_run()))
    rerun = _synthetic_run(checks=[dict(status="PASS", name="int8 medium c_fc 1024->4096", figure="rerun", stage="int8",
                                        row=["medium c_fc 1024->4096", "1.00", 1.2, 0.65, "2.00", 1.1, 0.8, 0.5])],
                           stages=dict(int8=dict(status="done", seconds=21.0, budget=35)), date="2026-12-05T10:30:00")
    run2 = tmp_path / "b.json"; run2.write_text(json.dumps(rerun))
    gc.main(["--from-json", str(run1), str(run2)])
    text = results.read_text()
    assert "not measured (no GPU)" not in text and text.rstrip().endswith("tail")
    assert "NVIDIA H200; torch 2.11.0+cu130, CUDA 13.0" in text and "2026-12-05T10:30:00" in text
    assert "| baseline MFU, compiled | >= 45% | PASS: 47.0% of 989 TFLOP/s |" in text
    assert "medium c_fc 1024->4096 0.65" in text and "int8 compiled code" not in text.split("| status | check | figure |")[0]
    assert "| compiled | done | 98.50 | 110 |" in text and "| int8 | done | 21.00 | 35 |" in text   # stage times and budgets
    assert "1.210 / odd" in text   # a '|' in a figure cannot break the table
    assert sum("int8 medium c_fc" in l and l.startswith("| PASS") for l in text.splitlines()) == 1   # the rerun replaced it
    for bad in (dict(tiny=True), dict(dry=True), dict(cuda=None), dict(device="CPU x")):
        p = tmp_path / "bad.json"; p.write_text(json.dumps(_synthetic_run(**bad)))
        with pytest.raises(SystemExit, match="not from a CUDA run"): gc.main(["--from-json", str(p)])
