"""flexgen_long.data and flexgen_long.tokenizers against plain-Python references."""

import random
import re
import sysconfig

import pytest
import torch

from flexgen_long.data import (CROSS_ENTROPY_IGNORE_INDEX, PYTHON_STDLIB, SYNTHETIC_TASKS, TaskSample, long_documents,
                               multikey_needle_task, pack_documents, passkey_task, task_samples, text_files)
from flexgen_long.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def test_byte_tokenizer_roundtrip():
    text = "héllo, wörld ✓"
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and max(ids) < TOK.vocab_size
    assert TOK.decode(ids) == text


def _reference_examples(docs, seq_len):
    """Token stream by a Python loop: each doc BOS text EOS; label = next token if it is in the same document (a
    document cut by a sequence boundary restarts there), else ignored; the last position has no label."""
    stream = [(t, d) for d, ids in enumerate(docs) for t in ids]
    out = []
    for s in range(len(stream) // seq_len):
        chunk = stream[s * seq_len:(s + 1) * seq_len]
        ids, doc_ids, labels, cur, prev = [], [], [], -1, None
        for t, d in chunk:
            if d != prev:
                cur, prev = cur + 1, d
            ids.append(t)
            doc_ids.append(cur)
        for i in range(seq_len):
            labels.append(ids[i + 1] if i + 1 < seq_len and doc_ids[i + 1] == doc_ids[i] else -100)
        out.append((ids, doc_ids, labels))
    return out


def test_packing_matches_reference():
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdef ") for _ in range(rng.randrange(1, 90))) for _ in range(30)]
    ds = pack_documents(TOK, texts, 64, seed=3)
    # the packer shuffles documents (seeded): recover the order from the packed stream's BOS positions
    stream = torch.cat([ds[i]["tokens"] for i in range(len(ds))]).tolist()
    encoded = {tuple(TOK.encode(t)) for t in texts}
    order, pos = [], 0
    while pos < len(stream):
        end = stream.index(TOK.eos_id, pos) + 1 if TOK.eos_id in stream[pos:] else len(stream)
        order.append(stream[pos:end])
        pos = end
    assert all(tuple(d) in encoded for d in order[:-1])  # all complete documents are real ones
    ref = _reference_examples(order, 64)
    assert len(ds) == len(ref) == sum(len(TOK.encode(t)) for t in texts) // 64
    for i, (ids, doc_ids, labels) in enumerate(ref):
        ex = ds[i]
        assert ex["tokens"].tolist() == ids
        assert ex["doc_ids"].tolist() == doc_ids
        assert ex["labels"].tolist() == labels


@pytest.mark.parametrize("task", [passkey_task, multikey_needle_task])
def test_synthetic_task_trains_on_the_answer_only(task):
    ids, trained = task(TOK, 1000, random.Random(0))
    assert len(ids) == len(trained) == 1000
    answer = TOK.decode([t for t, m in zip(ids, trained) if m])
    prompt = TOK.decode([t for t, m in zip(ids, trained) if not m])
    value = answer.strip().rstrip(".")
    assert value.isdigit() and prompt.count(value) >= 1  # the answer is hidden in the prompt
    assert prompt.rstrip().endswith("is") or prompt.rstrip().endswith("is:")


def test_synthetic_share_and_labels():
    ds = long_documents(TOK, 512, PYTHON_STDLIB, max_tokens=40_000, synthetic_share=0.25, synthetic_length=500)
    s = ds.stats
    share = s["synthetic_tokens"] / (s["synthetic_tokens"] + s["natural_tokens"])
    assert 0.2 < share < 0.3 and s["synthetic_documents"] > 0
    labels = torch.stack([ds[i]["labels"] for i in range(len(ds))])
    assert (labels != CROSS_ENTROPY_IGNORE_INDEX).any() and (labels == CROSS_ENTROPY_IGNORE_INDEX).any()


@pytest.mark.parametrize("seq_len,length,share", [(512, 512, 0.5), (512, 500, 0.3), (1024, 600, 0.9)])
def test_every_synthetic_task_lies_whole_in_one_sequence(seq_len, length, share):
    """A task cut by a sequence boundary would train an answer whose needle is not in view: each trained answer's
    document must start (BOS + intro) in the same sequence and hold the answer in a needle; no token is lost."""
    ds = long_documents(TOK, seq_len, PYTHON_STDLIB, max_tokens=60_000, synthetic_share=share,
                        synthetic_length=length)
    s = ds.stats
    intro = TOK.encode("There is important info", add_bos=False, add_eos=False)
    answers = 0
    for i in range(len(ds)):
        ex = ds[i]
        tok, lab, doc = ex["tokens"].tolist(), ex["labels"].tolist(), ex["doc_ids"].tolist()
        for d in sorted({doc[j] for j, l in enumerate(lab) if l != CROSS_ENTROPY_IGNORE_INDEX}):
            span = [t for t, e in zip(tok, doc) if e == d]
            if span[1:1 + len(intro)] != intro:
                continue  # a natural document: trained everywhere
            assert span[0] == TOK.bos_id and span[-1] == TOK.eos_id  # whole: from BOS to EOS in this sequence
            text = TOK.decode(span[1:-1])
            value = text.rsplit(" ", 1)[-1].rstrip(".")
            assert value.isdigit() and text[: -len(value) - 2].count(value) >= 1
            answers += 1
    assert answers > 0.8 * s["synthetic_documents"]  # all but the dropped tail
    kept = len(ds) * seq_len
    assert s["natural_tokens"] + s["synthetic_tokens"] + s["padding_tokens"] - kept < seq_len  # only the tail dropped


def test_synthetic_lengths_list_cycles_every_task_through_every_length():
    ds = long_documents(TOK, 1024, PYTHON_STDLIB, max_tokens=60_000, synthetic_share=0.5,
                        synthetic_length=[512, 1024], seed=2)
    intro = TOK.encode("There is important info", add_bos=False, add_eos=False)
    seen = set()
    for i in range(len(ds)):
        ex = ds[i]
        tok, doc = ex["tokens"].tolist(), ex["doc_ids"].tolist()
        for d in set(doc):
            span = [t for t, e in zip(tok, doc) if e == d]
            if span[1:1 + len(intro)] == intro:
                kind = "passkey" if "pass key" in TOK.decode(span) else "multikey_needle"
                seen.add((kind, len(span)))
    assert seen == {("passkey", 512), ("passkey", 1024), ("multikey_needle", 512), ("multikey_needle", 1024)}
    for bad in ([], [512, 2048], [32], ["512"], [True]):
        with pytest.raises(ValueError, match="synthetic_length must be"):
            long_documents(TOK, 1024, PYTHON_STDLIB, max_tokens=10_000, synthetic_share=0.2, synthetic_length=bad)


def test_a_task_longer_than_a_sequence_is_refused():
    with pytest.raises(ValueError, match=r"synthetic_length must be .* \[64, seq_len=128\]"):
        long_documents(TOK, 128, PYTHON_STDLIB, max_tokens=10_000, synthetic_share=0.2, synthetic_length=200)
    # 4 multi-key needles alone are ~480 byte tokens: more than a 256-token sequence
    with pytest.raises(ValueError, match=r"a multikey_needle task needs \d+ tokens .* seq_len=256"):
        long_documents(TOK, 256, PYTHON_STDLIB, max_tokens=10_000, synthetic_share=0.2, synthetic_length=200)


def test_stdlib_corpus_is_found_at_run_time():
    files = text_files(PYTHON_STDLIB)
    assert len(files) > 50 and all(str(f).startswith(sysconfig.get_paths()["stdlib"]) for f in files)


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta " * 50)
    (tmp_path / "c.bin").write_bytes(b"\0")
    assert [f.name for f in text_files(str(tmp_path))] == ["a.txt", "b.md"]
    assert [f.name for f in text_files(str(tmp_path / "**" / "*.md"))] == ["b.md"]
    ds = long_documents(TOK, 128, str(tmp_path))
    assert ds.stats["documents"] == 2 and len(ds) == (2 + 300 + 2 + 250) // 128


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset.source=.*no such file or directory"):
        text_files(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"dataset.source=.*no text files"):
        text_files(str(tmp_path / "*.txt"))
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(ValueError, match=r"fewer than one sequence of seq_len=4096"):
        long_documents(TOK, 4096, str(tmp_path))
    with pytest.raises(ValueError, match=r"dataset.synthetic_share must be a number in \[0, 1\)"):
        long_documents(TOK, 16, str(tmp_path), synthetic_share=1.0)
    with pytest.raises(ValueError, match=r"dataset.synthetic_tasks"):
        long_documents(TOK, 16, str(tmp_path), synthetic_share=0.5, synthetic_tasks=["sudoku"])


@pytest.mark.parametrize("task", [passkey_task, multikey_needle_task])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_synthetic_task_depth_and_prompt_length(task, depth):
    """The asked-for needle starts at ``depth`` of the filler; with prompt_only the prompt is exactly ``length``."""
    ids, trained = task(TOK, 3000, random.Random(7), depth=depth, prompt_only=True)
    prompt = [t for t, m in zip(ids, trained) if not m]
    assert len(prompt) == 3000 and trained[3000:] == [True] * (len(ids) - 3000)
    text = TOK.decode(prompt)
    value = TOK.decode([t for t, m in zip(ids, trained) if m]).strip().rstrip(".")
    # the needle holding the answer: "The pass key is V." or "...magic numbers for K is: V."
    needle_at = text.index(f" {value}.")
    intro_end = text.index("memorize it. ") + len("memorize it. ")
    question_at = text.rindex(" What is")
    filler_span = question_at - intro_end  # filler + needles, in characters (= bytes: ASCII)
    frac = (needle_at - intro_end) / filler_span
    assert abs(frac - depth) < 0.12, (frac, depth)  # the needles' own lengths shift it a little


@pytest.mark.parametrize("task", ["passkey", "multikey_needle"])
@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_the_needle_span_is_the_asked_for_needle_sentence(task, depth):
    """``needle_span``: the positions of the needle that holds the answer, its sentence and the spaces around it --
    and the option draws nothing else from the rng (the same tokens as without it)."""
    for seed in range(5):
        ids, trained, span = SYNTHETIC_TASKS[task](TOK, 1500, random.Random(seed), depth=depth, prompt_only=True,
                                                   needle_span=True)
        assert (ids, trained) == SYNTHETIC_TASKS[task](TOK, 1500, random.Random(seed), depth=depth, prompt_only=True)
        value = TOK.decode([t for t, m in zip(ids, trained) if m]).strip().rstrip(".")
        text = TOK.decode(ids[span.start:span.stop])
        if task == "passkey":
            assert text == f" The pass key is {value}. Remember it. {value} is the pass key. "
        else:
            key = re.search(r"special magic number for (\S+)\? ", TOK.decode(ids)).group(1)
            assert text == f" One of the special magic numbers for {key} is: {value}. "


def test_task_samples_split_prompt_answer_and_needle():
    """``task_samples``: the prompt (``length`` tokens), the answer without EOS and the needle span of each sample, the
    same for the same seed."""
    samples = task_samples(TOK, "passkey", 600, 0.5, 3, "s/600")
    assert samples == task_samples(TOK, "passkey", 600, 0.5, 3, "s/600")
    assert samples != task_samples(TOK, "passkey", 600, 0.5, 3, "s/601")
    rng = random.Random("s/600")
    for s in samples:
        ids, trained, span = passkey_task(TOK, 600, rng, depth=0.5, prompt_only=True, needle_span=True)
        assert s == TaskSample(ids[:600], ids[600:-1], span) and ids[-1] == TOK.eos_id
        assert TOK.decode(s.answer).startswith(" ") and span.stop <= len(s.prompt)


def test_synthetic_task_depth_refuses_out_of_range():
    with pytest.raises(ValueError, match=r"depth must be None \(random\) or a number in \[0, 1\], got 1.5"):
        passkey_task(TOK, 500, random.Random(0), depth=1.5)


def test_held_out_stdlib_source_is_disjoint_from_training():
    from flexgen_long.data import PYTHON_STDLIB_PACKAGES
    train, held = set(text_files(PYTHON_STDLIB)), set(text_files(PYTHON_STDLIB_PACKAGES))
    assert len(held) > 50 and not train & held
    assert not any("site-packages" in f.parts or "test" in f.parts for f in held)


def test_files_that_are_not_utf8_text_are_refused_or_skipped_and_counted(tmp_path, caplog):
    """Latin-1 text and binary data named .txt used to train as U+FFFD replacement characters, silently."""
    (tmp_path / "good.txt").write_text("é, ü, 漢字: " + "plain text, " * 40, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nul.txt").write_bytes(b"looks like text\x00\x00\x00")
    with pytest.raises(ValueError, match=r"binary.txt: not valid UTF-8 \(byte 128: invalid start byte\).*set "
                                         r"dataset.on_invalid_utf8=skip"):
        long_documents(ByteTokenizer(), 64, str(tmp_path))
    ds = long_documents(ByteTokenizer(), 64, str(tmp_path), on_invalid_utf8="skip")
    assert ds.stats["skipped_files"] == 3 and ds.stats["documents"] == 1
    assert sorted(p.rsplit("/", 1)[1] for p in ds.stats["skipped_file_names"]) == ["binary.txt", "latin1.txt",
                                                                                  "nul.txt"]
    text = bytes(t for t in ds.tokens.flatten().tolist() if t < 256)
    assert b"\xef\xbf\xbd" not in text and "é, ü, 漢字".encode() in text
    with pytest.raises(ValueError, match=r"dataset.on_invalid_utf8 must be one of \['error', 'skip'\], got 'ignore'"):
        long_documents(ByteTokenizer(), 64, str(tmp_path), on_invalid_utf8="ignore")

    # through the recipe: the user picks with dataset.on_invalid_utf8, and the log says how many were skipped
    from omegaconf import OmegaConf
    from recipes.longgen_finetune import LongGenFinetuneRecipe
    from pathlib import Path
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_longgen.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"output_dir={tmp_path / 'out'}", f"dataset.source={tmp_path}", "seq_len=64", "model.max_seq_len=64",
        "model.sparse_pattern.window=30", "dataset.max_tokens=null", "dataset.synthetic_share=0", "batch_size=1",
        "gradient_accumulation_steps=1", "dataset.synthetic_length=null", "dataset.on_invalid_utf8=skip"]))
    caplog.set_level("INFO")
    recipe = LongGenFinetuneRecipe(cfg)
    try:
        recipe.setup(cfg)
    finally:
        recipe.release()
    assert "Data: skipped 3 file(s) that are not UTF-8 text (dataset.on_invalid_utf8=skip)" in caplog.text


def test_min_document_tokens_joins_consecutive_files_into_long_documents(tmp_path):
    """Length extension needs documents as long as the sequences (positions restart per document): consecutive texts
    are joined, in order, each tokenized on its own, until a document holds min_document_tokens tokens."""
    from flexgen_long.data import joined_documents

    texts = ["a" * 30, "b" * 50, "c" * 10, "d" * 70, "e" * 5]
    docs = list(joined_documents(TOK, texts, 64))
    sep = TOK.encode("\n\n", add_bos=False, add_eos=False)
    enc = lambda t: TOK.encode(t, add_bos=False, add_eos=False)  # noqa: E731
    assert docs == [[TOK.bos_id] + enc(texts[0]) + sep + enc(texts[1]) + [TOK.eos_id],
                    [TOK.bos_id] + enc(texts[2]) + sep + enc(texts[3]) + [TOK.eos_id],
                    [TOK.bos_id] + enc(texts[4]) + [TOK.eos_id]]          # the rest: shorter, still a document
    assert all(len(d) >= 64 for d in docs[:-1])
    with pytest.raises(ValueError, match=r"dataset.min_document_tokens must be null or an int >= 2, got 0"):
        list(joined_documents(TOK, texts, 0))

    # through long_documents: the files of a directory in sorted order (90, 150, 30, 210, 15 bytes) -> documents of
    # 244, 244 and 17 tokens (BOS, a separator between joined files, EOS)
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t * 3)
    ds = long_documents(TOK, 128, str(tmp_path), min_document_tokens=200)
    assert ds.stats["documents"] == 3 and ds.stats["natural_tokens"] == sum(len(t) * 3 for t in texts) + 3 * 2 + 2 * 2
    one_per_file = long_documents(TOK, 128, str(tmp_path))
    assert one_per_file.stats["documents"] == 5


def test_symlink_loops_and_repeated_files_are_read_once(tmp_path):
    """A ** glob follows a link back to its parent folder (each level lists the files again) and two links may name
    one file: every file is listed once, as its first path."""
    from flexgen_long.data import text_files

    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # sub/loop/sub/loop/... down to the OS's limit
    (tmp_path / "c.txt").symlink_to(tmp_path / "a.txt")
    files = text_files(str(tmp_path / "**" / "*.txt"))
    assert sorted(str(f.relative_to(tmp_path)) for f in files) == ["a.txt", "sub/b.txt"]
    assert sorted(str(f.relative_to(tmp_path)) for f in text_files(str(tmp_path))) == ["a.txt", "sub/b.txt"]


def test_a_file_larger_than_the_run_needs_is_not_read_whole(tmp_path):
    """max_tokens bounds what is read of each file: the tail of a large file -- here invalid UTF-8, which reading it
    whole would refuse -- is never read, and the documents are the file's first tokens exactly."""
    from flexgen_long.data import MAX_BYTES_PER_TOKEN, long_documents
    from flexgen_long.tokenizers import ByteTokenizer

    head = ("x = 1\n" * 100_000).encode()  # 600 KB of text, then binary garbage
    (tmp_path / "big.txt").write_bytes(head + b"\xff\xfe" * 1000)
    max_tokens = 2048
    assert max_tokens * MAX_BYTES_PER_TOKEN < len(head)
    ds = long_documents(ByteTokenizer(), 256, str(tmp_path / "big.txt"), max_tokens=max_tokens)
    got = ds.tokens.flatten().tolist()
    want = ByteTokenizer().encode(head.decode()[:max_tokens * 2], add_bos=True, add_eos=False)
    assert len(got) == 2048 and got == want[:len(got)]


def test_a_prefix_cut_inside_a_character_is_not_an_error(tmp_path):
    from flexgen_long.data import read_text_file

    (tmp_path / "t.txt").write_bytes("ééé".encode())  # 6 bytes, 2 per character
    assert read_text_file(tmp_path / "t.txt", max_bytes=3) == "é"
    assert read_text_file(tmp_path / "t.txt") == "ééé"
