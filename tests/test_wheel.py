"An installed wheel, outside the checkout, runs an experiment: the template and the task configs are package data."
import json, os, site, subprocess, sys, zipfile
from pathlib import Path
import pytest
from conftest import TINY_EVALS, TINY_RUN

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    "A fresh venv with the built wheel installed (its dependencies: this venv's site-packages, by a .pth file)."
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    whl = next((tmp / "dist").glob("quantstudy-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
    py = tmp / "venv" / "bin" / "python"
    own = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "quantstudy-deps.pth").write_text(site.getsitepackages()[0] + "\n")   # a .pth path: its editable finder is not loaded
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(whl)], check=True, capture_output=True)
    return whl, py, tmp

def test_the_wheel_holds_the_template_and_the_task_configs(wheel_venv):
    names = zipfile.ZipFile(wheel_venv[0]).namelist()
    assert "quantstudy/templates/experiment.ipynb" in names and "quantstudy/tasks/arc_easy.yaml" in names
    assert {"quantstudy/analysis/__init__.py", "quantstudy/evaluate/__main__.py", "quantstudy/rundir.py"} <= set(names)

def test_an_installed_wheel_runs_an_experiment(wheel_venv, data_dir):
    "`quantstudy run` from the wheel, in a directory outside the checkout (README: the full smoke baseline takes minutes)."
    _, py, tmp = wheel_venv
    work = tmp / "elsewhere"; work.mkdir()
    code = ("import json, quantstudy, quantstudy.runner as r; "
            f"res = r.run_experiment('baseline', 'smoke', overrides={TINY_RUN!r}, evals={TINY_EVALS!r}, analyses=[], runs_root='papermill_runs'); "
            "print(json.dumps(dict(file=quantstudy.__file__, template=str(r.TEMPLATE), status=res.status.value, commit=res.git_commit, "
            "metrics=sorted(res.metrics))))")
    env = {**os.environ, "QUANTSTUDY_DATA": str(data_dir), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([py, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    venv = str(tmp / "venv")
    assert got["file"].startswith(venv) and got["template"].startswith(venv)   # the installed package, not the checkout
    assert got["status"] == "complete" and got["commit"] is None and got["metrics"] == ["lambada", "perplexity", "perplexity_text", "perplexity_window_mean", "tasks"]
    nb = json.loads((work / "papermill_runs" / "smoke" / "baseline.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"] == {"run_json": "papermill_runs/smoke/baseline/run.json"}
