"""Training loops the benchmarks time side by side: the package's real `train()` (HF Trainer) and a plain PyTorch loop.

Both build the model and optimizer the way `train()` does (`build_model`, `make_optimizer`: QAdamW and the cosine
schedule), run the same micro batches, accumulation, gradient clipping, precision and the same log / eval / save
cadence, and stamp the time at the end of two optimizer steps, the first and the last of a window (with a device sync
there only, the same two in both loops), so that tokens/s over the window compare the loops, not their start-up."""
from __future__ import annotations
import contextlib, math, os, time
from pathlib import Path
import numpy as np, torch
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy
import quantstudy.train as qt
from quantstudy.host import tune_cpu_allocator
from quantstudy.optim import make_optimizer
from quantstudy.data import BlockDataset
from quantstudy.model import build_model, eval_mode

def synthetic_tokens(n: int, vocab: int = 1024, seed: int = 0) -> np.ndarray:
    "`n` tokens of a random Markov chain over the first `vocab` ids, each with 4 successors (entropy ~1.1 nats): a loss falls fast."
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, (vocab, 4))
    pick = rng.choice(4, n, p=[0.55, 0.25, 0.12, 0.08])
    succ, out, t = succ.tolist(), [0] * n, int(rng.integers(vocab))   # Python lists: a plain loop is fastest
    for i, k in enumerate(pick.tolist()):
        out[i] = t
        t = succ[t][k]
    return np.array(out, np.uint16 if vocab <= 2 ** 16 else np.int32)

def synthetic_datasets(cfg, train_tokens: int, seed: int = 0):
    "Train and validation `BlockDataset`s of the same chain (validation: its continuation)."
    toks = synthetic_tokens(train_tokens + (cfg.eval_blocks or 8) * cfg.block_size + 1, seed=seed)
    return BlockDataset(toks[:train_tokens], cfg.block_size), BlockDataset(toks[train_tokens:], cfg.block_size)

def _sync(device) -> None:
    if str(device).startswith("cuda"): torch.cuda.synchronize()

class StepClock(TrainerCallback):
    "`perf_counter` at the end of the optimizer steps in `marks` (after a device sync there, and only there)."
    # a sync at every step of the window would drain the launch queue that the plain loop keeps full: on CUDA that
    # biases "train() / plain loop" against train(); both loops sync at the window's two ends only
    def __init__(self, marks): self.marks, self.t = set(marks), {}
    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.marks: _sync(args.device); self.t[state.global_step] = time.perf_counter()

def window_rate(t: dict, cfg) -> float:
    "Tokens per second between the first and last stamped steps."
    a, b = min(t), max(t)
    return (b - a) * cfg.batch_size * cfg.block_size / (t[b] - t[a])

@contextlib.contextmanager
def patched_train(datasets=None, compile_backend: str | None = None, evaluate: bool = True):
    "`quantstudy.train.train` reading `datasets` (train, val) instead of a corpus, compiling the model with `compile_backend`, evaluating only if `evaluate`."
    saved = qt.datasets_for, qt.training_args
    env = {k: os.environ.get(k) for k in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_DYNAMIC")}
    if datasets is not None: qt.datasets_for = lambda cfg, tokenizer=None: datasets
    if compile_backend is not None or not evaluate:
        def training_args(*a, **kw):
            args = saved[1](*a, **kw)
            if compile_backend is not None:   # what TrainingArguments(torch_compile=True) sets
                args.torch_compile, args.torch_compile_backend = True, compile_backend
            if not evaluate:   # no eval at the start nor at eval_steps (train() adds one at the end unless eval_every divides max_steps)
                args.eval_on_start, args.eval_strategy = False, IntervalStrategy.NO
            return args
        qt.training_args = training_args
    try: yield
    finally:
        qt.datasets_for, qt.training_args = saved
        for k, v in env.items():   # TrainingArguments(torch_compile=True) exports these for accelerate: undo it
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

def run_train(cfg, out_dir, recipe=None, datasets=None, warm: int = 2, compile_backend: str | None = None,
              evaluate: bool = True) -> dict:
    "The package's `train()` from scratch: its result and tokens/s over steps `warm`..`max_steps` (timed as `plain_loop` times)."
    clock = StepClock((warm, cfg.max_steps))
    with patched_train(datasets, compile_backend, evaluate):
        res = qt.train(cfg, out_dir, recipe, resume=False, callbacks=[clock])
    return dict(tokens_per_s=window_rate(clock.t, cfg), result=res,
                train_loss=[p["loss"] for p in res["curves"]["train"]], val_loss=[p["loss"] for p in res["curves"]["val"]])

class PlainLoop:
    "A plain PyTorch training loop doing what `train()` does, one optimizer step (with its log / eval / save) per `step()`."
    def __init__(self, cfg, recipe=None, datasets=None, out_dir=None, compile_backend: str | None = None, device=None):
        self.cfg, self.out_dir, self.step_no = cfg, out_dir, 0
        self.device = device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu": tune_cpu_allocator()
        self.train_ds, self.val_ds = datasets if datasets is not None else qt.datasets_for(cfg)
        self.model = build_model(cfg.size, recipe, seed=cfg.seed, n_positions=cfg.block_size, resid_pdrop=cfg.dropout,
                                 embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **cfg.model).to(device).train()
        self.model.recipe = recipe if recipe is not None else self.model.recipe
        torch.manual_seed(cfg.seed)   # dropout's stream (CPU and CUDA) starts where the Trainer's does: it seeds too
        self.opt, self.sched = make_optimizer(self.model, cfg, recipe)
        self.fwd = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        self.amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if qt.use_bf16(cfg) else contextlib.nullcontext
        self.accum = cfg.batch_size // cfg.micro_batch_size
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.stream, self.train_loss = self._batches(), []
        self.acc, self.logged = torch.zeros((), device=device), 0
        self.val_loss = [self.evaluate()]   # the Trainer's eval_on_start

    def _batches(self):
        while True:
            for idx in torch.randperm(len(self.train_ds), generator=self.gen).split(self.cfg.micro_batch_size):
                if len(idx) == self.cfg.micro_batch_size: yield torch.stack([self.train_ds[int(i)]["input_ids"] for i in idx])

    def evaluate(self) -> float:
        "Mean loss over the validation blocks, in micro batches, dropout off."
        losses, n, mb = [], len(self.val_ds), self.cfg.micro_batch_size
        with eval_mode(self.model), torch.no_grad(), self.amp():
            for i in range(0, n, mb):
                x = torch.stack([self.val_ds[j]["input_ids"] for j in range(i, min(i + mb, n))]).to(self.device)
                losses.append(self.fwd(input_ids=x, labels=x).loss)
        return torch.stack(losses).mean().item()

    def step(self) -> int:
        "One optimizer step: accumulation, clipping, QAdamW, schedule; then the log / eval / save due at it."
        cfg, self.step_no = self.cfg, self.step_no + 1
        for _ in range(self.accum):
            x = next(self.stream).to(self.device, non_blocking=True)
            with self.amp(): loss = self.fwd(input_ids=x, labels=x).loss / self.accum
            loss.backward()
            self.acc += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step(); self.sched.step(); self.opt.zero_grad(set_to_none=True)
        s = self.step_no
        if s % cfg.log_every == 0 or s == 1:   # the Trainer's logging_first_step and logging_steps
            self.train_loss.append(self.acc.item() / (s - self.logged)); self.acc.zero_(); self.logged = s
        if s % cfg.eval_every == 0: self.val_loss.append(self.evaluate())
        if self.out_dir is not None and s % cfg.save_every == 0:
            ckpt = Path(self.out_dir) / f"step-{s}"; ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), ckpt / "model.pt"); torch.save(self.opt.state_dict(), ckpt / "optimizer.pt")
        return s

def plain_loop(cfg, recipe=None, datasets=None, out_dir=None, warm: int = 2, compile_backend: str | None = None,
               device=None) -> dict:
    "`PlainLoop` for `cfg.max_steps` steps: tokens/s over steps `warm`..`max_steps`, the losses, the model."
    loop, t = PlainLoop(cfg, recipe, datasets, out_dir, compile_backend, device), {}
    while loop.step_no < cfg.max_steps:
        s = loop.step()
        if s in (warm, cfg.max_steps): _sync(loop.device); t[s] = time.perf_counter()
    if cfg.max_steps % cfg.eval_every: loop.val_loss.append(loop.evaluate())
    return dict(tokens_per_s=window_rate(t, cfg), train_loss=loop.train_loss, val_loss=loop.val_loss, model=loop.model)

class Alternate(TrainerCallback):
    "Runs one step of a `PlainLoop` after each Trainer step, timing both: the loops see the same machine load."
    def __init__(self, loop: PlainLoop): self.loop, self.trainer_s, self.plain_s, self.t = loop, {}, {}, None
    def on_step_begin(self, args, state, control, **kw):
        if self.t is None: self.t = time.perf_counter()   # the first step: the Trainer's set-up is behind it
    def on_step_end(self, args, state, control, **kw):
        t0 = time.perf_counter()
        self.trainer_s[state.global_step] = t0 - self.t   # this Trainer step, its log / eval / save of the step before included
        self.loop.step()
        self.t = time.perf_counter(); self.plain_s[self.loop.step_no] = self.t - t0

def train_vs_plain(cfg, out_dir, recipe=None, datasets=None, warm: int = 5) -> dict:
    "`train()` and a `PlainLoop` stepping alternately in one process: tokens/s of each over steps `warm`+1..`max_steps`."
    alt = Alternate(PlainLoop(cfg, recipe, datasets, Path(out_dir) / "plain"))
    with patched_train(datasets):
        res = qt.train(cfg, Path(out_dir) / "train", recipe, resume=False, callbacks=[alt])
    if cfg.max_steps % cfg.eval_every: alt.loop.val_loss.append(alt.loop.evaluate())   # as train() ends: the last point
    # the Trainer's log / eval / save of step k runs after on_step_end(k), so it lands in step k + 1's time;
    # the plain loop's is inside its step k: compare steps warm+1..max_steps of the Trainer with warm..max_steps-1 of the loop
    tr = sum(alt.trainer_s[k] for k in range(warm + 1, cfg.max_steps + 1))
    pl = sum(alt.plain_s[k] for k in range(warm, cfg.max_steps))
    tokens = (cfg.max_steps - warm) * cfg.batch_size * cfg.block_size
    return dict(train_tokens_per_s=tokens / tr, plain_tokens_per_s=tokens / pl, ratio=pl / tr,
                trainer_s=alt.trainer_s, plain_s=alt.plain_s, result=res, plain_val_loss=alt.loop.val_loss,
                train_val_loss=[p["loss"] for p in res["curves"]["val"]])
