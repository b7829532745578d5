"Shared fixtures: the data root, an isolated token cache, a tiny training config and model; the `numerics` marker."
import os
from pathlib import Path
import pytest

# the data root: $QUANTSTUDY_DATA, else shared/data beside the repository (where the Makefile points it)
DATA = Path(os.environ.get("QUANTSTUDY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAVE_DATA = (DATA / "ptb").is_dir()

def pytest_configure(config):
    config.addinivalue_line("markers", "numerics: compares floating-point outcomes; `make numerics` reruns these "
                                       "under AVX2 kernels and 2 threads (see the Makefile)")

@pytest.fixture(scope="session", autouse=True)
def _data_env(tmp_path_factory):
    "Every test (and fixture) sees the data root in $QUANTSTUDY_DATA and a token cache of this session."
    with pytest.MonkeyPatch.context() as mp:
        if HAVE_DATA: mp.setenv("QUANTSTUDY_DATA", str(DATA))
        mp.setenv("QUANTSTUDY_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
        yield

@pytest.fixture(scope="session")
def data_dir() -> Path:
    "The local data root; a test that asks for it is skipped where there is none."
    if not HAVE_DATA: pytest.skip(f"no data root at {DATA} (set QUANTSTUDY_DATA)")
    return DATA

@pytest.fixture(scope="session")
def tiny_config(data_dir):
    "A factory of 2-layer, 32-wide smoke configs on PTB (its ~80k-token valid split as the training set: fast)."
    from quantstudy.train import TrainConfig
    base = dict(size="tiny", model=dict(n_layer=2, n_head=2, n_embd=32), corpus="ptb", train_split="valid",
                val_split="test", data_dir=str(data_dir), block_size=32, batch_size=8, micro_batch_size=4, max_steps=24,
                warmup_steps=2, eval_every=8, eval_blocks=8, log_every=2, save_every=4, lr=3e-3)
    return lambda **kw: TrainConfig(**{**base, **kw})

@pytest.fixture(scope="session")
def tiny_model():
    "A factory of seeded tiny GPT-2s (2 layers, 32 wide, 32 positions unless overridden), quantized by `recipe`."
    from quantstudy.model import build_model
    return lambda recipe=None, **kw: build_model("tiny", recipe, seed=0, **{**dict(n_layer=2, n_embd=32, n_positions=32), **kw})
