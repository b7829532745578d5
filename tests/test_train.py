"Training end to end: exact resume after a real SIGKILL, and DDP on 2 CPU processes matching 1 process."
import json, math, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from quantstudy.config import TrainConfig, preset
from quantstudy.rundir import RunDir
from quantstudy.model import Recipe
from quantstudy.qlinear import LinearQuant
from quantstudy.optim import OptimQuant

pytestmark = pytest.mark.usefixtures("data_dir")   # every test here trains on PTB: skipped without a data root

RECIPE = Recipe(linear=LinearQuant(weight="8-channel", act="8-token"), optim=OptimQuant(m="8-channel"))

def env(tmp):
    return {**os.environ, "QUANTSTUDY_CACHE": str(tmp / "cache"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

def run(cfg_path, tmp, nproc=1, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(random.randint(20000, 40000))] if nproc > 1 else [sys.executable]) + ["-m", "quantstudy.train", "--config", str(cfg_path)]
    return subprocess.Popen(cmd, env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

def finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out

def result(d): return json.loads((Path(d) / "train_result.json").read_text())   # a bare training run: the trainer's hand-off

def record(d, cfg, recipe=RECIPE) -> Path:
    "Write run directory `d`'s run.json for a bare training run of `cfg` and `recipe`; its path (the trainer's --config)."
    return RunDir(d).write_run("t", Path(d).name, dict(train=cfg.to_dict(), recipe=recipe.to_dict()))

def test_sigkill_resume_is_bit_exact(tiny_config, tmp_path):
    cfg = tiny_config()
    a_json, b_json = record(tmp_path / "a", cfg), record(tmp_path / "b", cfg)
    finish(run(a_json, tmp_path))
    # b: killed with SIGKILL once a random checkpoint is complete (possibly mid-way through writing the next one)
    kill_at = random.choice([4, 8, 12, 16])
    p = run(b_json, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        ck = RunDir(tmp_path / "b").last_checkpoint() if (tmp_path / "b").exists() else None
        if ck and int(ck.name.split("-")[1]) >= kill_at: break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (tmp_path / "b" / "train_result.json").exists()
    finish(run(b_json, tmp_path))
    a, b = result(tmp_path / "a"), result(tmp_path / "b")
    assert all(math.isfinite(p["loss"]) for p in a["curves"]["train"]), "the run diverged: no resume question to ask"
    assert b["resumed_from"] is not None and a["resumed_from"] is None
    assert a["curves"] == b["curves"]                     # every logged loss, lr and grad norm, bit for bit
    wa, wb = load_file(tmp_path / "a/model/model.safetensors"), load_file(tmp_path / "b/model/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

@pytest.mark.numerics
def test_ddp_two_processes_match_one(tiny_config, tmp_path):
    cfg = tiny_config(dropout=0.0, max_steps=8, eval_every=4, save_every=8)   # no dropout: ranks draw different masks
    finish(run(record(tmp_path / "one", cfg), tmp_path))
    finish(run(record(tmp_path / "two", cfg), tmp_path, nproc=2))
    one, two = result(tmp_path / "one"), result(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    l1 = [p["loss"] for p in one["curves"]["train"]]; l2 = [p["loss"] for p in two["curves"]["train"]]
    assert len(l1) == len(l2) > 2
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-5, (l1, l2)
    v1 = [p["loss"] for p in one["curves"]["val"]]; v2 = [p["loss"] for p in two["curves"]["val"]]
    assert max(abs(x - y) for x, y in zip(v1, v2)) < 1e-5, (v1, v2)

def test_bad_config_fails_before_work(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size"): tiny_config(batch_size=6)
    with pytest.raises(ValueError, match="precision='fp16'"): tiny_config(precision="fp16")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"): tiny_config().replace(learning_rate=1)

@pytest.mark.numerics
def test_divergence_is_recorded_not_raised(tiny_config, tmp_path, monkeypatch):
    from quantstudy.train import train
    monkeypatch.setenv("QUANTSTUDY_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(lr=30.0, warmup_steps=0, max_steps=40, grad_clip=1e9, eval_every=4, save_every=40, log_every=2)
    res = train(cfg, tmp_path / "div", Recipe(linear=LinearQuant(grad="4-tensor")))
    assert res["status"] == "diverged" and res["step"] == 40 and res["reason"], res   # trained on to the end, as the paper's runs
    assert "no better than uniform" in res["divergence"]["final"] and res["divergence"]["spikes"] and res["evaluable"]
    assert json.loads((tmp_path / "div" / "train_result.json").read_text())["status"] == "diverged"
    early = train(cfg.replace(stop_on_divergence=True), tmp_path / "stop", Recipe(linear=LinearQuant(grad="4-tensor")))
    assert early["status"] == "diverged" and early["step"] < 40 and not early["evaluable"], early   # an early stop, on request

def test_trainer_losses_are_the_mean_cross_entropy(tmp_path):
    "The HF Trainer's eval loss is the mean over the T-1 targets of each row (it was (T-1)/T of it: 63/64 at T=64)."
    from transformers import Trainer, TrainingArguments
    from quantstudy.model import build_model
    model = build_model("tiny", seed=0, n_positions=16).eval()
    g = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": x, "labels": x} for x in torch.randint(0, 1000, (8, 16), generator=g)]
    plain = torch.stack([model(b["input_ids"][None], labels=b["labels"][None]).loss for b in blocks]).mean().item()
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    got = Trainer(model=model, args=args, eval_dataset=blocks).evaluate()["eval_loss"]
    assert abs(got - plain) < 1e-5 * plain and abs(got - plain * 15 / 16) > 1e-3   # not the old (T-1)/T

@pytest.mark.parametrize("max_steps,eval_every,save_every", [(8, 4, 4), (12, 8, 6)], ids=["eval-at-end", "eval-after-last-save"])
def test_a_run_resumed_at_its_last_step_only_evaluates(tiny_config, tmp_path, max_steps, eval_every, save_every):
    "Issue 19, item 2: a finished run whose hand-off is gone resumes from checkpoint-max_steps: no step 31/30, no second final point."
    from quantstudy.train import train
    cfg = tiny_config(max_steps=max_steps, eval_every=eval_every, save_every=save_every)
    first = train(cfg, tmp_path / "r")
    weights = load_file(tmp_path / "r/model/model.safetensors")
    (tmp_path / "r" / "train_result.json").unlink()   # as after deleting a finished run's results.json
    again = train(cfg, tmp_path / "r")
    assert all(torch.equal(v, load_file(tmp_path / "r/model/model.safetensors")[k]) for k, v in weights.items())
    assert again["step"] == first["step"] == max_steps
    assert again["resumed_from"] == f"checkpoint-{max_steps}"
    steps = [p["step"] for p in again["curves"]["val"]]
    assert len(steps) == len(set(steps)) and steps[-1] == max_steps, steps
    assert again["curves"]["val"] == first["curves"]["val"] and again["curves"]["train"] == first["curves"]["train"]
