"Data: failure messages, the token-file cache (reuse, atomic writes), blocks, the OpenWebText split, the hub branch."
import collections, math, os
from pathlib import Path
import numpy as np, pytest, torch, datasets
import quantstudy.data as data
from quantstudy.data import (CORPORA, BlockDataset, data_root, heldout_split, load_corpus, load_tokenizer,
                             tokenize_corpus)

pytestmark = pytest.mark.usefixtures("data_dir")   # conftest: the data root, or every test here is skipped
datasets.disable_progress_bars()

@pytest.fixture(scope="module")
def tok(data_dir): return load_tokenizer(data_dir)

def test_data_root(data_dir, monkeypatch, tmp_path):
    assert data_root() == data_dir and data_root(tmp_path) == tmp_path   # the argument wins over the env var
    monkeypatch.delenv("QUANTSTUDY_DATA")
    assert data_root() is None                                         # nothing named: the hub
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")): data_root(tmp_path / "nope")

def test_tokenizer(data_dir, tok):
    assert load_tokenizer(data_dir, add_prefix_space=False)("Hello world")["input_ids"] == [15496, 995]
    assert tok("Hello world")["input_ids"] == [18435, 995] and len(tok) == 50257 and tok.eos_token_id == 50256

def test_missing_corpus_names_the_path(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as e: load_corpus("wikitext2", "train", data_dir)
    assert str(data_dir / "wikitext-2" / "wiki.train.tokens") in str(e.value) and "QUANTSTUDY_DATA" in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ptb" / "ptb.test.txt")): load_corpus("ptb", "test", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer" / "gpt2")): load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.txt"): load_corpus(tmp_path / "nope.txt", "test")
    (tmp_path / "a.train.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="a.train.txt"): load_corpus(tmp_path, "test")   # lists what is there

def test_missing_corpus_fails_before_tokenizing(data_dir, tmp_path, monkeypatch, tok):
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(FileNotFoundError, match="wiki.train.tokens"): tokenize_corpus("wikitext2", "train", tok, data_dir, tmp_path)

def test_unknown_names():
    with pytest.raises(ValueError) as e: load_corpus("c4", "train")
    assert all(n in str(e.value) for n in CORPORA)
    with pytest.raises(ValueError, match="test"): load_corpus("lambada", "train")    # lists lambada's splits
    with pytest.raises(ValueError, match="validation"): load_corpus("ptb", "heldout")

@pytest.mark.parametrize("name,split,file", [("ptb", "train", "ptb/ptb.train.txt"), ("ptb", "valid", "ptb/ptb.valid.txt"),
    ("wikitext2", "test", "wikitext-2/wiki.test.tokens"), ("wikitext103", "test", "wikitext-103/wiki.test.tokens"),
    ("wikitext2-raw", "test", "wikitext-2/wiki.test.raw"), ("wikitext103-raw", "validation", "wikitext-2/wiki.valid.raw"),
    ("lm1b", "dev", "1bw/1b_benchmark.dev.tokens"), ("openwebtext-sample", None, "openwebtext-sample/openwebtext_first100docs.txt")])
def test_documents_reproduce_the_file(data_dir, name, split, file):
    text = (data_dir / file).read_text(encoding="utf-8")
    if split is None:   # the OpenWebText sample: train + validation are a permutation of its paragraphs
        docs = [d for s in ("train", "validation") for d in load_corpus(name, s)["text"]]
        assert sorted(docs) == sorted(data._paragraphs(text))
    else: assert "".join(load_corpus(name, split)["text"]) == text

def test_every_local_corpus_loads():
    n = 0
    for name, c in CORPORA.items():
        for split in c.splits:
            try: ds = load_corpus(name, split, limit=5)
            except FileNotFoundError:   # not in shared/data: WikiText and 1BW train, WT-103 tokens valid, the full OpenWebText
                assert (split == "train" and name in ("wikitext2", "wikitext103", "wikitext2-raw", "wikitext103-raw", "lm1b")
                        or (name, split) == ("wikitext103", "validation") or name == "openwebtext"); continue
            assert ds.column_names == ["text"] and len(ds) == 5 and all(isinstance(t, str) and t for t in ds["text"])
            n += 1
    assert n == 18

def test_lambada_and_shakespeare(data_dir):
    lam = load_corpus("lambada", "test")
    assert len(lam) == 5153 and lam[0]["text"].startswith("In my palm is a clear stone")
    text = (data_dir / "tinyshakespeare/input.txt").read_text()
    parts = ["".join(load_corpus("tinyshakespeare", s)["text"]) for s in ("train", "validation", "test")]
    assert "".join(parts) == text and [len(p) for p in parts] == [1003854, 55770, 55770]

def test_local_file_and_directory(tmp_path):
    (tmp_path / "train.txt").write_text("one\n\ntwo\nlines\n\n\nthree")
    (tmp_path / "my.valid.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert list(load_corpus(tmp_path, "train")["text"]) == ["one\n\n", "two\nlines\n\n\n", "three"]
    assert list(load_corpus(tmp_path, "val")["text"]) == ["a", "b"]
    assert list(load_corpus(tmp_path / "train.txt", "train")["text"]) == ["one\n\n", "two\nlines\n\n\n", "three"]
    with pytest.raises(ValueError, match="single file"): load_corpus(tmp_path / "train.txt", "test")   # not its own split

def test_owt_split_is_deterministic_and_disjoint(data_dir):
    full = data._paragraphs((data_dir / "openwebtext-sample/openwebtext_first100docs.txt").read_text())
    train, val = (list(load_corpus("openwebtext-sample", s)["text"]) for s in ("train", "validation"))
    assert len(val) == math.ceil(0.005 * len(full)) == 11 and len(train) + len(val) == len(full)
    assert collections.Counter(train) + collections.Counter(val) == collections.Counter(full)   # a partition
    dup = {p for p, k in collections.Counter(full).items() if k > 1}   # repeated paragraphs ("Advertisement") may land in both
    assert set(train) & set(val) <= dup
    assert list(load_corpus("openwebtext-sample", "validation")["text"]) == val                   # same seed, same split
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(1000)]})
    a, b = heldout_split(ds, "validation", 0.005), heldout_split(ds, "validation", 0.005, seed=1)
    assert len(a) == 5 and list(a["text"]) != list(b["text"])

def test_tokens_are_the_documents_tokens(data_dir, tok, tmp_path):
    ids = tokenize_corpus("ptb", "valid", tok, data_dir, tmp_path)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and len(ids) == 92830
    docs = load_corpus("ptb", "valid")["text"]
    assert ids.tolist() == [i for d in tok(list(docs))["input_ids"] for i in d]
    assert tok.decode(ids) == (data_dir / "ptb/ptb.valid.txt").read_text()   # lines start with a space: lossless
    eos = tokenize_corpus("ptb", "valid", tok, data_dir, tmp_path, eos=True)
    assert len(eos) == len(ids) + len(docs) and eos[-1] == 50256 and (eos == 50256).sum() == len(docs)
    assert np.array_equal(tokenize_corpus("ptb", "valid", tok, data_dir, tmp_path, max_tokens=777), ids[:777])
    assert np.array_equal(tokenize_corpus("ptb", "valid", tok, data_dir, tmp_path, max_tokens=10**9), ids)

def test_cache_is_reused(data_dir, tok, tmp_path, monkeypatch):
    first = tokenize_corpus("ptb", "test", tok, data_dir, tmp_path)
    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tokenize_corpus("ptb", "test", tok, data_dir, tmp_path)
    assert calls == [] and again.filename == first.filename and np.array_equal(again, first)
    monkeypatch.setenv("QUANTSTUDY_CACHE", str(tmp_path))   # the env var names the same cache
    assert tokenize_corpus("ptb", "test", tok, data_dir).filename == first.filename and calls == []
    # each option is part of the key: a new file, tokenized anew
    other = [tokenize_corpus("ptb", "test", tok, data_dir, tmp_path, eos=True),
             tokenize_corpus("ptb", "test", load_tokenizer(data_dir, add_prefix_space=False), data_dir, tmp_path),
             tokenize_corpus("ptb", "test", tok, data_dir, tmp_path, max_tokens=100)]
    assert len(calls) == 3 and len({first.filename, *(o.filename for o in other)}) == 4

def test_cache_follows_the_source_file(tok, tmp_path, monkeypatch):
    src = tmp_path / "corpus" / "test.txt"
    src.parent.mkdir(); src.write_text("hello world\n")
    a = tokenize_corpus(src.parent, "test", tok, cache_dir=tmp_path / "cache")
    src.write_text("hello there world\n")
    os.utime(src, ns=(1, 1))   # size changes too, but make sure
    b = tokenize_corpus(src.parent, "test", tok, cache_dir=tmp_path / "cache")
    assert a.filename != b.filename and tok.decode(b) == " hello there world\n"

def test_interrupted_write_never_counts(data_dir, tok, tmp_path, monkeypatch):
    ref = tokenize_corpus("ptb", "test", tok, data_dir, tmp_path / "ref")
    name = Path(ref.filename).name
    cache = tmp_path / "cache"
    cache.mkdir()
    # leftovers of a killed run: tmp files holding garbage
    for stale in (f"{name}.{os.getpid()}.tmp", f"{name}.12345.tmp", f"{name}.tmp"):
        (cache / stale).write_bytes(b"\x01\x02" * 7)
    # a run that dies just before the atomic rename leaves no token file behind
    def die(*a): raise KeyboardInterrupt
    monkeypatch.setattr(data.os, "replace", die)
    with pytest.raises(KeyboardInterrupt): tokenize_corpus("ptb", "test", tok, data_dir, cache)
    assert not (cache / name).exists()
    monkeypatch.undo()
    monkeypatch.setenv("QUANTSTUDY_DATA", str(data_dir))
    out = tokenize_corpus("ptb", "test", tok, data_dir, cache)
    assert Path(out.filename).name == name and np.array_equal(out, ref)
    assert not (cache / f"{name}.{os.getpid()}.tmp").exists()

def test_num_proc(data_dir, tok, tmp_path):
    a = tokenize_corpus("lm1b", "validation", tok, data_dir, tmp_path / "a", num_proc=1)
    b = tokenize_corpus("lm1b", "validation", tok, data_dir, tmp_path / "b", num_proc=2)
    assert np.array_equal(a, b)

def test_block_dataset(data_dir, tok, tmp_path):
    ids = tokenize_corpus("wikitext2", "valid", tok, data_dir, tmp_path)
    for bs in (1, 7, 1024):
        blocks = BlockDataset(ids, bs)
        assert len(blocks) == len(ids) // bs
        b = blocks[len(blocks) - 1]
        assert set(b) == {"input_ids", "labels"} and b["input_ids"].shape == (bs,) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["input_ids"], b["labels"]) and torch.equal(blocks[-1]["input_ids"], b["input_ids"])
        if bs > 1:
            stream = torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))])
            assert np.array_equal(stream.numpy(), ids[:len(blocks) * bs])   # the stream, the partial block dropped
        with pytest.raises(IndexError): blocks[len(blocks)]
    batch = next(iter(torch.utils.data.DataLoader(BlockDataset(ids, 16), batch_size=3, shuffle=True)))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 16)
    assert len(BlockDataset(torch.arange(10), 3)) == 3 and BlockDataset([1, 2, 3, 4], 2)[1]["labels"].tolist() == [3, 4]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError): BlockDataset(ids, bad)
    with pytest.raises(ValueError, match="no block"): BlockDataset(ids[:10], 11)

# the hub branch, with a stand-in for datasets.load_dataset (no hub here)
HUB = {("Salesforce/wikitext", "wikitext-2-v1", "test"): {"text": ["", " = A = \n", "", " b c \n"]},
       ("ptb_text_only", "validation"): {"sentence": ["a b", "c <unk> N"]},
       ("lm1b", "test"): {"text": ["A sentence .", "Another ."]},
       ("karpathy/tiny_shakespeare", "test"): {"text": ["First:\nHi.\n\nSecond:\nHo."]},
       ("Skylion007/openwebtext", "train"): {"text": [f"page {i}" for i in range(1000)]},
       ("EleutherAI/lambada_openai", "default", "test"): {"text": ["x y", "z"]}}

@pytest.fixture
def hub(monkeypatch):
    seen = []
    def load_dataset(*args, split):
        seen.append((*args, split))
        return datasets.Dataset.from_dict(HUB[(*args, split)])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)   # data.py imports it where it reads the hub
    monkeypatch.delenv("QUANTSTUDY_DATA")
    return seen

def test_hub_branch(data_dir, hub, tmp_path):
    assert list(load_corpus("wikitext2", "test")["text"]) == [" \n", " = A = \n", " \n", " b c \n"]   # as in the raw file
    assert list(load_corpus("ptb", "valid")["text"]) == [" a b \n", " c <unk> N \n"]                 # as in ptb.valid.txt
    assert list(load_corpus("lm1b", "test")["text"]) == ["A sentence .\n", "Another .\n"]
    assert list(load_corpus("tinyshakespeare", "test")["text"]) == ["First:\nHi.\n\n", "Second:\nHo."]
    assert list(load_corpus("lambada", "test")["text"]) == ["x y", "z"]
    train, val = load_corpus("openwebtext", "train"), load_corpus("openwebtext", "validation", limit=3)
    assert len(train) == 995 and len(val) == 3 and not set(train["text"]) & set(val["text"])
    assert hub[:2] == [("Salesforce/wikitext", "wikitext-2-v1", "test"), ("ptb_text_only", "validation")]
    with pytest.raises(ValueError, match="1b_benchmark.dev.tokens"): load_corpus("lm1b", "validation")   # not on the hub
    tok = load_tokenizer(data_dir)
    ids = tokenize_corpus("ptb", "valid", tok, cache_dir=tmp_path)
    assert tok.decode(ids) == " a b \n c <unk> N \n" and tokenize_corpus("ptb", "valid", tok, cache_dir=tmp_path).filename == ids.filename

def test_hub_tokenizer(data_dir, monkeypatch):
    seen, real = [], data.GPT2TokenizerFast.from_pretrained
    monkeypatch.setattr(data.GPT2TokenizerFast, "from_pretrained",
                        lambda path, **kw: seen.append((path, kw)) or real(str(data_dir / "tokenizer/gpt2"), **kw))
    monkeypatch.delenv("QUANTSTUDY_DATA")
    assert len(load_tokenizer()) == 50257 and seen[0] == ("gpt2", {"add_prefix_space": True})
