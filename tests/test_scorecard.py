"The scorecard (notebook 12): each claim judged from results.json files written by a real tiny run (conftest's `results_like`)."
import math
import pytest
from conftest import write_study
from quantstudy import scorecard as S
from quantstudy.cli import main

BASE = 5.6
MAX_STEPS = 8   # the tiny run's max_steps: a divergence step is read against it ("explodes early")


@pytest.fixture(scope="module")
def run(results_like):
    "A `Results` of experiment `name` ending exactly at `final_loss` (a diverged or failed one ends at `step`)."
    def make(name, final_loss=BASE, status="complete", step=None, **fields):
        return results_like(name, status=status, final_loss=final_loss if status == "complete" else None, step=step, **fields)
    return make


def _sharp(scale):
    return {"data": {"analysis": "sharpness", "sharpness": [0.1 * scale, 0.3 * scale, 0.6 * scale]}}


def _baseline(run):
    acc = lambda act: {"parameters": 100, "gradients": 100, "optimizer_state": 200, "optimizer_buffers": 0, "saved_activations": act}
    return run("baseline", final_loss=BASE, analysis={
        "sharpness": _sharp(1.0),
        "linear_time": {"data": {"rows": [{"seq_len": 128, "share": 0.86}, {"seq_len": 512, "share": 0.81}, {"seq_len": 1024, "share": 0.7}]}},
        "memory": {"data": {"rows": [{"sweep": "batch", "batch_size": 1, "accounting": acc(50)},
                                     {"sweep": "batch", "batch_size": 32, "accounting": acc(900)},
                                     {"sweep": "seq", "batch_size": 4, "accounting": acc(10)}]}},
    })


def _ptq(run, name, ppl_factor):
    "A PTQ model whose perplexities are `ppl_factor` times the baseline's (results_like scales them with the final loss)."
    return run(name, final_loss=BASE + math.log(ppl_factor))


def paper_like_study(run) -> dict:
    "A study whose numbers show every claim of the paper (and the new one)."
    about = lambda n, f=1.005: run(n, final_loss=BASE * f)
    div = lambda n, step=6: run(n, status="diverged", step=step)
    worse = lambda n: run(n, final_loss=BASE * 1.06)
    res = {"baseline": _baseline(run), "w8-tensor": about("w8-tensor"), "w8-channel": about("w8-channel"),
           "w4-tensor": run("w4-tensor", final_loss=BASE * 1.10, analysis={"sharpness": _sharp(1.5)}),
           "w4-channel": run("w4-channel", final_loss=BASE * 1.03, analysis={"sharpness": _sharp(1.5)}),
           "a8-token": about("a8-token"), "a4-tensor": div("a4-tensor"),
           "a4-token": run("a4-token", final_loss=BASE * 1.08), "a4-token-asym": run("a4-token-asym", final_loss=BASE * 1.04),
           "a4-channel": worse("a4-channel"), "g4-tensor": div("g4-tensor"), "g4-token": div("g4-token"), "g8-token": worse("g8-token"),
           "g8-tensor": div("g8-tensor"), "g8-token-input": div("g8-token-input", step=2), "m8-channel": about("m8-channel"),
           "m4-tensor": div("m4-tensor"), "v8-tensor": div("v8-tensor"), "v8-channel": div("v8-channel"), "w8a8": about("w8a8"),
           "w8a8g8": worse("w8a8g8"),
           **{n: _ptq(run, n, 1.01) for n in ("ptq-w8-tensor", "ptq-w8-channel", "ptq-a8-tensor", "ptq-a8-channel")},
           **{n: _ptq(run, n, 100.0) for n in ("ptq-w4-tensor", "ptq-w4-channel")},
           **{n: about(n, 1.004) for n in ("v8-channel-unsigned", "v8-block128", "v4-rank1-nozero", "m4v4-li")}}
    return res


def verdicts(results):
    return {r["key"]: r["verdict"] for r in S.scorecard(results)}


def test_the_runs_end_where_asked(run):
    r = run("w8a8", final_loss=BASE * 1.02)
    assert r.config["train"]["max_steps"] == MAX_STEPS and r.config["name"] == "w8a8"
    assert S.final_loss(r) == pytest.approx(BASE * 1.02, rel=1e-12) and S.outcome({"w8a8": r}, "w8a8").state == "complete"
    d = run("g8-token-input", status="diverged", step=2)
    assert d.step == 2 and S.outcome({"g8-token-input": d}, "g8-token-input").state == "diverged" and not d.metrics


def test_every_claim_listed_once():
    keys = [c.key for c in S.CLAIMS]
    assert len(keys) == len(set(keys)) >= 22
    assert {"w8", "w4-channel", "a8-token", "a4-tensor", "a4-asym", "a4-channel", "g4", "g8-token", "g8-tensor", "g-input",
            "m8", "m4-tensor", "v8", "w8a8", "w8a8g8", "ptq8", "ptq4", "sharpness", "linear-time", "memory", "fixed-v", "fixed-v-nozero"} == set(keys)


def test_a_paper_like_study_reproduces_everything(run):
    v = verdicts(paper_like_study(run))
    assert set(v.values()) == {"reproduced"}, {k: x for k, x in v.items() if x != "reproduced"}


def test_an_empty_study_runs_nothing():
    assert set(verdicts({}).values()) == {"not run"}


def test_verdicts_flip_with_the_numbers(run):
    res = paper_like_study(run)
    res["v8-channel"] = run("v8-channel", final_loss=BASE * 1.001)                 # converges: the paper's claim fails
    res["w8-tensor"] = run("w8-tensor", final_loss=BASE * 1.021)                   # just outside "about" (2%)
    res["g8-token-input"] = run("g8-token-input", status="diverged", step=7)       # diverges, but late (of 8)
    res["v4-rank1-nozero"] = run("v4-rank1-nozero", final_loss=BASE * 1.011)       # outside the new claim's 1%
    res["baseline"].analysis["linear_time"]["data"]["rows"][1]["share"] = 0.9      # share rises with length
    res["w4-channel"].analysis["sharpness"] = _sharp(0.9)
    v = verdicts(res)
    for key in ("v8", "w8", "g-input", "fixed-v", "fixed-v-nozero", "linear-time", "sharpness"): assert v[key] == "not reproduced", key
    assert v["w8a8"] == "reproduced"


def test_boundaries_follow_the_declared_tolerances(run):
    res = {"baseline": _baseline(run)}
    for f, want in ((1 + 0.99 * S.TOLERANCES["about"], "reproduced"), (1 + 1.01 * S.TOLERANCES["about"], "not reproduced")):
        res["w8a8"] = run("w8a8", final_loss=BASE * f)
        assert verdicts(res)["w8a8"] == want, f
    # "diverges" also means ending more than 1 nat above the baseline without a recorded divergence
    res["m4-tensor"] = run("m4-tensor", final_loss=BASE + S.TOLERANCES["diverge_nats"] + 0.05)
    assert verdicts(res)["m4-tensor"] == "reproduced"
    res["m4-tensor"] = run("m4-tensor", final_loss=BASE + S.TOLERANCES["diverge_nats"] - 0.05)
    assert verdicts(res)["m4-tensor"] == "not reproduced"


def test_failed_runs_are_not_judged(run):
    res = {"baseline": _baseline(run), "w8a8": run("w8a8", status="failed", step=4)}
    row = next(r for r in S.scorecard(res) if r["key"] == "w8a8")
    assert row["verdict"] == "not run" and "failed" in row["numbers"]
    res["baseline"] = run("baseline", status="failed", step=2)
    assert verdicts(res)["w8"] == "not run"


def test_partial_claims_name_what_was_not_run(run):
    res = {"baseline": _baseline(run), "w8-channel": run("w8-channel", final_loss=BASE)}
    row = next(r for r in S.scorecard(res) if r["key"] == "w8")
    assert row["verdict"] == "reproduced" and "`w8-tensor` not run" in row["numbers"]


def test_write_and_cli(run, tmp_path, capsys):
    root = write_study(tmp_path / "runs", "study", paper_like_study(run))
    assert main(["scorecard", "study", "--runs-root", str(root), "--out", str(tmp_path / "figs")]) == 0
    md = (tmp_path / "figs" / "study" / "scorecard.md").read_text()
    assert md.count("**reproduced**") == len(S.CLAIMS) and "`about`: 0.02" in md and "| 22 |" in md
    assert str(tmp_path / "figs" / "study" / "scorecard.md") in capsys.readouterr().out
    assert not list((tmp_path / "figs" / "study").glob(".scorecard.md.*"))      # the temporary file was renamed
    assert main(["scorecard", "nope", "--runs-root", str(root), "--out", str(tmp_path / "figs")]) == 2
    assert "no results directory" in capsys.readouterr().err


def test_small_scale_notes_only_for_claims_that_fail(run):
    res = paper_like_study(run)
    res["a4-tensor"] = run("a4-tensor", final_loss=BASE * 1.01)
    md = S.render_scorecard("smoke", res)
    assert "(a4-tensor):" in md and "(g4):" not in md
