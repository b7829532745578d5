"""Tokenization and perplexity-evaluation throughput, each against its floor measured side by side.

Tokenization: `quantstudy.data.tokenize_corpus` on PTB train into a fresh cache directory (uncached: the full work)
vs one batched call of the same fast tokenizer on the same lines. Evaluation: `quantstudy.evaluate.perplexity.perplexity` of a
tiny GPT-2 on ~20k PTB test tokens vs a bare `no_grad` forward over the same blocks (no loss, no bookkeeping)."""
import os, tempfile
import torch
from _common import parser, setup, interleaved, machine, markdown_table, write_section
from quantstudy.data import load_tokenizer, load_corpus, tokenize_corpus
from quantstudy.model import build_model

def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="the data root (default: $QUANTSTUDY_DATA)")
    p.add_argument("--max-tokens", type=int, default=20_000, help="tokens of PTB test to evaluate")
    args = p.parse_args()
    setup(args)
    import datasets; datasets.disable_progress_bars()
    dev, data = args.device, args.data_dir
    tok = load_tokenizer(data)
    texts = list(load_corpus("ptb", "train", data)["text"])
    n_tok = []
    def tokenize():
        with tempfile.TemporaryDirectory() as d: n_tok.append(len(tokenize_corpus("ptb", "train", tok, data_dir=data, cache_dir=d)))
    def raw(): tok(texts)["input_ids"]
    reps = args.reps or 3
    tk = interleaved({"tokenizer(texts)": raw, "tokenize_corpus": tokenize}, reps=reps, min_time=0.0, device="cpu")
    rows = [["tokenize_corpus('ptb', 'train'), fresh cache", f"{n_tok[-1]:,}", f"{n_tok[-1] / tk['tokenize_corpus'][0]:,.0f}",
             "tokenizer(lines), one batch", f"{n_tok[-1] / tk['tokenizer(texts)'][0]:,.0f}", tk["tokenize_corpus"][1]]]
    print(rows[-1])

    model = build_model("tiny", seed=0).to(dev).eval()
    ctx, bs = model.config.n_positions, 8
    with tempfile.TemporaryDirectory() as d:
        ids = torch.from_numpy(tokenize_corpus("ptb", "test", tok, data_dir=data, cache_dir=d, max_tokens=args.max_tokens).astype("int64"))
    ids = ids[:args.max_tokens]
    note = ""
    try:
        from quantstudy.evaluate.perplexity import perplexity
        def evaluate(): perplexity(model, ids, context=ctx, batch_size=bs, progress=False)
    except Exception as e:   # quantstudy.evaluate.perplexity not importable: time the bare forward only
        evaluate, note = None, f"quantstudy.evaluate.perplexity not importable ({type(e).__name__}); only the bare forward is timed."
    n_blocks = (len(ids) - 1) // ctx
    blocks = ids[:n_blocks * ctx].view(n_blocks, ctx).to(dev)
    def forward():
        with torch.no_grad():
            for i in range(0, n_blocks, bs): model(input_ids=blocks[i:i + bs])
    cands = {"forward": forward} if evaluate is None else {"forward": forward, "perplexity": evaluate}
    ev = interleaved(cands, reps=args.reps or 5, min_time=0.0, device=dev)
    n_eval = n_blocks * ctx
    ppl_tps = "" if evaluate is None else f"{n_eval / ev['perplexity'][0]:,.0f}"
    rows.append([f"perplexity(tiny GPT-2, PTB test, context {ctx}, batch {bs})", f"{n_eval:,}", ppl_tps,
                 "no_grad forward over the same blocks", f"{n_eval / ev['forward'][0]:,.0f}",
                 "" if evaluate is None else ev["perplexity"][1]])
    table = markdown_table(["work", "tokens", "tokens/s", "floor", "floor tokens/s", "time / floor"], rows)
    print(table)
    if note: print(note)
    if not args.no_write:
        write_section("data_eval", f"## data_eval.py: tokenization and evaluation throughput\n\n{machine(dev)}; median of "
                      f"{reps} (tokenization) and {args.reps or 5} (evaluation) interleaved repetitions.\n\n{table}"
                      + (f"\n\n{note}" if note else ""), dev)

if __name__ == "__main__": main()
