"""Long-document training data: documents -> tokens -> packed sequences with document ids.

A training example is one packed sequence of exactly ``seq_len`` tokens::

    tokens   [seq_len] int64   documents laid end to end, each ``BOS text EOS``
    labels   [seq_len] int64   the next token inside the same document, else -100 (ignored by the loss)
    doc_ids  [seq_len] int32   0, 0, ..., 1, 1, ...: a document is a maximal run of equal ids; the model restarts
                               positions and attention patterns in each one (flexgen_long.patterns, "Documents")

A natural document longer than what is left of a sequence continues in the next one as a new document (its own
positions); the tail that does not fill a whole sequence is dropped. Length extension needs documents as long as the
sequences (positions restart per document, so short files never reach the new positions): ``min_document_tokens``
joins consecutive files (sorted order: neighbouring modules of one package) into documents of at least that many
tokens (``joined_documents``), as repository-level code corpora do. Synthetic long-context tasks (passkey retrieval,
multi-key needle) can be mixed in at a configurable share of tokens; they are trained on their answers only, and each
lies whole inside one sequence: one cut by a sequence boundary would train the model to produce an answer whose needle
it cannot see (a hallucination drill -- the first repro runs lost their retrieval that way). Where a task does not fit
what is left of a sequence, later tasks that fit fill the gap, then natural text, then untrained padding
(``_keep_tasks_whole``).

Sources: local text files (a directory, a glob, a file, or ``"python-stdlib"``: the standard library's own ``.py``
files, which exist on every machine with Python and need no network -- the tiny job's corpus), and Hugging Face
datasets (``hf_long_documents``; imports ``datasets`` lazily, needs the hub or a local cache).

All text is tokenized up front into one int32 tensor (``max_tokens`` bounds it): simple and deterministic, which is
what resuming mid-epoch needs. Corpora of billions of tokens want a streaming variant.
"""

from __future__ import annotations

import codecs
import glob as globlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import Dataset

from .tokenizers import sequence_start

__all__ = ["PYTHON_STDLIB", "PYTHON_STDLIB_PACKAGES", "PackedDocuments", "long_documents", "hf_long_documents",
           "text_files", "read_text_file", "check_packing_args", "ON_INVALID_UTF8", "passkey_task",
           "multikey_needle_task", "SYNTHETIC_TASKS", "TaskSample", "task_samples", "ANSWER_ROOM",
           "CROSS_ENTROPY_IGNORE_INDEX", "joined_documents"]

PYTHON_STDLIB = "python-stdlib"
#: The standard library's *subpackages* (``email/``, ``asyncio/`` ...; no tests, no site-packages): files disjoint from
#: ``python-stdlib`` (top-level modules only), so evaluation text held out from the training corpus.
PYTHON_STDLIB_PACKAGES = "python-stdlib-packages"
_NOT_HELD_OUT = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "__pycache__"}
#: Bytes of a file read per token of ``max_tokens``: a generous bound on what one token can cover (byte-level and BPE
#: tokenizers average 1-5 bytes), so that a file far larger than a run needs is not read whole.
MAX_BYTES_PER_TOKEN = 64
CROSS_ENTROPY_IGNORE_INDEX = -100  # torchtune's and torch's default ignore_index
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".html", ".tex")


# -- sources ------------------------------------------------------------------------------------------------------------
def text_files(source: str, suffixes: Iterable[str] = _TEXT_SUFFIXES) -> list[Path]:
    """Files of a local source, sorted: ``"python-stdlib"`` (the top-level ``.py`` modules of this Python's standard
    library, found at run time via ``sysconfig``), ``"python-stdlib-packages"`` (the ``.py`` files of its subpackages:
    disjoint from the former, the held-out evaluation text), a glob (``data/**/*.txt``), a directory (every file with one of
    ``suffixes``, recursively) or one file. Raises ``FileNotFoundError`` naming ``dataset.source`` when nothing
    matches."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"dataset.source must be a path, a glob, {PYTHON_STDLIB!r} or {PYTHON_STDLIB_PACKAGES!r}, "
                         f"got {source!r}")
    if source == PYTHON_STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        where = f"{PYTHON_STDLIB} ({root})"
    elif source == PYTHON_STDLIB_PACKAGES:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*/**/*.py") if p.is_file()
                       and not _NOT_HELD_OUT & set(p.relative_to(root).parts[:-1])
                       and not p.relative_to(root).parts[0].startswith("config-"))
        where = f"{PYTHON_STDLIB_PACKAGES} ({root})"
    elif any(c in source for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
        where = f"glob {source!r}"
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            suffixes = tuple(suffixes)
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
            where = f"directory {str(path)!r} (suffixes {', '.join(suffixes)})"
        elif path.is_file():
            files = [path]
            where = str(path)
        else:
            raise FileNotFoundError(f"dataset.source={source!r}: no such file or directory (give a directory, a glob, "
                                    f"a file or {PYTHON_STDLIB!r})")
    if not files:
        raise FileNotFoundError(f"dataset.source={source!r}: no text files in {where}")
    # each file once: a glob's ** follows symlinks (a link back to a parent folder lists its files again at every
    # depth the OS allows), and two links can name one file
    seen: set[str] = set()
    return [f for f in files if not ((real := os.path.realpath(f)) in seen or seen.add(real))]


#: What to do with a source file that is not UTF-8 text: refuse the run, naming the file (the default), or skip it and
#: count it in the log. Decoding it anyway would train on U+FFFD replacement characters (binary data, Latin-1 text).
ON_INVALID_UTF8 = ("error", "skip")


def read_text_file(path: Path, on_invalid_utf8: str = "error", skipped: list | None = None,
                   field: str = "dataset.on_invalid_utf8", max_bytes: int | None = None) -> str | None:
    """The text of a UTF-8 file -- its first ``max_bytes`` bytes at most (cut at a character boundary), so that a
    file far larger than the tokens a run needs is not read whole. A file that is not valid UTF-8, or holds NUL bytes
    (binary data), raises a ``ValueError`` naming it (``on_invalid_utf8="error"``) or is appended to ``skipped`` and
    returns None ("skip")."""
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise ValueError(f"{field} must be one of {list(ON_INVALID_UTF8)}, got {on_invalid_utf8!r}")
    with open(path, "rb") as f:
        data = f.read(-1 if max_bytes is None else max_bytes + 1)
    cut = max_bytes is not None and len(data) > max_bytes
    try:  # a prefix may end inside a character: the incremental decoder leaves those bytes out
        text, problem = codecs.getincrementaldecoder("utf-8")().decode(data[:max_bytes] if cut else data,
                                                                        final=not cut), None
        if "\x00" in text:
            problem = f"binary data (a NUL byte at byte {data.index(0)})"
    except UnicodeDecodeError as e:
        problem = f"not valid UTF-8 (byte {e.start}: {e.reason})"
    if problem is None:
        return text
    if on_invalid_utf8 == "skip":
        if skipped is not None:
            skipped.append(Path(path))
        return None
    raise ValueError(f"{path}: {problem}; it is not UTF-8 text. Convert or remove the file"
                     + (f", or set {field}=skip to skip such files (they are counted in the log)" if field else ""))


def _read_files(files: list[Path], on_invalid_utf8: str, skipped: list, max_bytes: int | None = None) -> Iterator[str]:
    for f in files:
        text = read_text_file(f, on_invalid_utf8, skipped, max_bytes=max_bytes)
        if text is not None and text.strip():
            yield text


def joined_documents(tokenizer, texts: Iterable[str], min_tokens: int, separator: str = "\n\n") -> Iterator[list[int]]:
    """Token ids of documents made of consecutive ``texts`` joined by ``separator`` until each holds at least
    ``min_tokens`` tokens (``start text separator text ... EOS``, ``start`` = ``sequence_start``); the last one may be
    shorter. Each text is tokenized on its own (a join never merges tokens across two texts)."""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 2:
        raise ValueError(f"dataset.min_document_tokens must be null or an int >= 2, got {min_tokens!r}")
    start = sequence_start(tokenizer)
    sep = tokenizer.encode(separator, add_bos=False, add_eos=False)
    doc = list(start)
    for text in texts:
        if len(doc) > len(start):
            doc += sep
        doc += tokenizer.encode(text, add_bos=False, add_eos=False)
        if len(doc) + 1 >= min_tokens:
            yield doc + [tokenizer.eos_id]
            doc = list(start)
    if len(doc) > len(start):
        yield doc + [tokenizer.eos_id]


# -- synthetic long-context tasks ---------------------------------------------------------------------------------------
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _fill(tokenizer, n: int) -> list[int]:
    """``n`` tokens of the classic passkey filler (token-level repetition: no huge strings to encode)."""
    unit = tokenizer.encode(_FILLER, add_bos=False, add_eos=False)
    return (unit * (n // len(unit) + 1))[:max(n, 0)]


def _task(tokenizer, length: int, needles: list[str], question: str, answer: str, rng: random.Random, *,
          depth: float | None = None, target: int = 0, prompt_only: bool = False, needle_span: bool = False):
    """``start intro filler(needles at random depths) question answer EOS`` of exactly ``length`` tokens (or more
    when the needles alone exceed it); the trained mask covers the answer and EOS. ``start`` is what the tokenizer
    begins plain text with (``tokenizers.sequence_start``: BOS, or nothing for SmolLM2). Returns (tokens, trained),
    with ``needle_span`` (tokens, trained, span): ``span`` is the ``range`` of token positions that needle ``target``
    (its sentence with the spaces around it) occupies.

    ``depth`` in [0, 1]: needle ``target`` (the one asked for) starts at that fraction of the filler (0 = right after
    the intro, 1 = right before the question); the others stay at random depths. ``prompt_only``: ``length`` counts
    the prompt (everything before the answer) instead of the whole example -- evaluation's context length, equal for
    every task and answer, so a grid cell is one prompt shape. With neither, the rng is drawn from exactly as before
    (training data is unchanged by these options)."""
    if depth is not None and not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be None (random) or a number in [0, 1], got {depth!r}")
    enc = lambda s: tokenizer.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    intro = enc("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. ")
    needle_ids = [enc(" " + s + " ") for s in needles]
    q, a = enc(" " + question), enc(" " + answer)
    start = sequence_start(tokenizer)
    fixed = len(start) + len(intro) + sum(map(len, needle_ids)) + len(q) + (0 if prompt_only else len(a) + 1)
    filler = _fill(tokenizer, length - fixed)
    cuts = [rng.randrange(len(filler) + 1) for _ in needles]
    if depth is not None:
        cuts[target] = round(depth * len(filler))
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i != target))
    else:  # as before: the sorted random cuts are dealt to the needles in order
        cuts, order = sorted(cuts), range(len(needles))
        cuts = dict(zip(order, cuts))
    head = start + intro
    body, prev, at = [], 0, 0
    for i in order:
        body += filler[prev:cuts[i]]
        if i == target:
            at = len(head) + len(body)
        body += needle_ids[i]
        prev = cuts[i]
    body += filler[prev:]
    prompt = head + body + q
    tokens = prompt + a + [tokenizer.eos_id]
    trained = [False] * len(prompt) + [True] * (len(a) + 1)
    if needle_span:
        return tokens, trained, range(at, at + len(needle_ids[target]))
    return tokens, trained


def passkey_task(tokenizer, length: int, rng: random.Random, *, depth: float | None = None,
                 prompt_only: bool = False, needle_span: bool = False):
    """Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden at a random depth (or at ``depth``, a
    fraction of the filler), asked for at the end. ``prompt_only``, ``needle_span``: see ``_task``."""
    key = str(rng.randrange(10000, 100000))
    return _task(tokenizer, length, [f"The pass key is {key}. Remember it. {key} is the pass key."],
                 "What is the pass key? The pass key is", f"{key}.", rng, depth=depth, prompt_only=prompt_only,
                 needle_span=needle_span)


def multikey_needle_task(tokenizer, length: int, rng: random.Random, num_keys: int = 4, *,
                         depth: float | None = None, prompt_only: bool = False, needle_span: bool = False):
    """Multi-key needle (RULER's MK-NIAH): ``num_keys`` key/value needles at random depths, one key asked for; with
    ``depth``, the asked-for needle sits at that fraction of the filler. ``prompt_only``, ``needle_span``: see
    ``_task`` (the span is the asked-for needle's)."""
    keys = [f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randrange(100)}" for _ in range(num_keys)]
    values = [str(rng.randrange(1000000, 10000000)) for _ in keys]
    j = rng.randrange(num_keys)
    return _task(tokenizer, length, [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)],
                 f"What is the special magic number for {keys[j]}? The special magic number for {keys[j]} is:",
                 f"{values[j]}.", rng, depth=depth, target=j, prompt_only=prompt_only, needle_span=needle_span)


_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lagoon", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
          "willow", "xenon", "yarrow", "zephyr")

SYNTHETIC_TASKS: dict[str, Callable] = {"passkey": passkey_task, "multikey_needle": multikey_needle_task}
#: Tokens after a task's prompt: its answer (" 12345." for a passkey, " 1234567." for a multi-key needle: at most 9
#: byte-level tokens) and slack. A prompt of L tokens needs a model with max_seq_len >= L + ANSWER_ROOM.
ANSWER_ROOM = 16


@dataclass(frozen=True)
class TaskSample:
    """One synthetic task split for evaluation and scoring: ``prompt`` ids, ``answer`` ids (without EOS) and ``needle``,
    the token positions of the asked-for needle sentence in the prompt."""

    prompt: list[int]
    answer: list[int]
    needle: range


def task_samples(tokenizer, task: str, length: int, depth: float, n: int, seed: str) -> list[TaskSample]:
    """``n`` samples of ``task`` (a ``SYNTHETIC_TASKS`` name) with the asked-for needle at ``depth`` and prompts of
    ``length`` tokens (``prompt_only``; longer where the intro, needles and question alone exceed it), drawn from
    ``random.Random(seed)``: a str seed is hashed deterministically, so every model and every run gets the same
    samples for the same ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids, trained, needle = SYNTHETIC_TASKS[task](tokenizer, length, rng, depth=depth, prompt_only=True,
                                                     needle_span=True)
        start = trained.index(True)
        out.append(TaskSample(ids[:start], ids[start:-1], needle))
    return out


# -- packing ------------------------------------------------------------------------------------------------------------
class PackedDocuments(Dataset):
    """Fixed-length packed sequences (see the module docstring). ``stats`` counts documents and tokens by kind."""

    def __init__(self, tokens: torch.Tensor, trained: torch.Tensor, doc_start: torch.Tensor, seq_len: int,
                 stats: dict):
        n = tokens.numel() // seq_len
        self.seq_len = seq_len
        self.tokens = tokens[: n * seq_len].view(n, seq_len)
        self.trained = trained[: n * seq_len].view(n, seq_len)
        self.doc_start = doc_start[: n * seq_len].view(n, seq_len).clone()
        self.doc_start[:, 0] = True  # a document cut by a sequence boundary continues as a new one
        self.stats = dict(stats, sequences=n)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        tokens, start = self.tokens[i].long(), self.doc_start[i]
        doc_ids = torch.cumsum(start, 0, dtype=torch.int32) - 1
        labels = torch.full_like(tokens, CROSS_ENTROPY_IGNORE_INDEX)
        # predict token t+1 at t only inside one document and only where t+1 is trained
        keep = ~start[1:] & self.trained[i, 1:]
        labels[:-1] = torch.where(keep, tokens[1:], CROSS_ENTROPY_IGNORE_INDEX)
        return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids}


def _task_lengths(synthetic_length, seq_len: int) -> list:
    """``synthetic_length`` as a list: null -> [seq_len], an int -> [it], a list -> itself."""
    if isinstance(synthetic_length, (list, tuple)):
        return list(synthetic_length)
    return [seq_len if synthetic_length is None else synthetic_length]


def check_packing_args(seq_len, max_tokens, synthetic_share, synthetic_length, synthetic_tasks):
    """The packing arguments' checks, callable before any text is read (the recipe checks its config up front)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < seq_len):
        raise ValueError(f"dataset.max_tokens must be null or an int >= seq_len={seq_len}, got {max_tokens!r}")
    if not isinstance(synthetic_share, (int, float)) or not 0 <= synthetic_share < 1:
        raise ValueError(f"dataset.synthetic_share must be a number in [0, 1), got {synthetic_share!r}")
    lengths = _task_lengths(synthetic_length, seq_len)
    bad_length = lambda n: isinstance(n, bool) or not isinstance(n, int) or not 64 <= n <= seq_len  # noqa: E731
    if synthetic_length is not None and (not lengths or any(map(bad_length, lengths))):
        raise ValueError(f"dataset.synthetic_length must be null (= seq_len), an int in [64, seq_len={seq_len}] or a "
                         f"non-empty list of them (a task must fit one sequence), got {synthetic_length!r}")
    bad = [t for t in synthetic_tasks if t not in SYNTHETIC_TASKS]
    if bad or not synthetic_tasks:
        raise ValueError(f"dataset.synthetic_tasks must be a non-empty list of {sorted(SYNTHETIC_TASKS)}, "
                         f"got {list(synthetic_tasks)!r}")


def pack_documents(tokenizer, texts: Iterable[str], seq_len: int, *, max_tokens: int | None = None,
                   synthetic_share: float = 0.0, synthetic_length: int | list[int] | None = None,
                   synthetic_tasks=("passkey", "multikey_needle"), seed: int = 0,
                   min_document_tokens: int | None = None) -> PackedDocuments:
    """Tokenize ``texts`` (each one document, ``BOS text EOS``; with ``min_document_tokens``, consecutive texts joined
    into documents of at least that many tokens, ``joined_documents``), mix in synthetic tasks so that they make
    ``synthetic_share`` of the tokens, shuffle the documents (seeded) and pack them into ``seq_len`` sequences.
    ``synthetic_length``: one task length, or a list that the tasks cycle through (each task at each length in turn).
    ``max_tokens`` bounds the total (natural + synthetic)."""
    synthetic_tasks = list(synthetic_tasks)
    check_packing_args(seq_len, max_tokens, synthetic_share, synthetic_length, synthetic_tasks)
    natural_budget = None if max_tokens is None else int(max_tokens * (1 - synthetic_share))
    docs: list[tuple[list[int], list[bool] | None]] = []
    natural = 0
    documents = (tokenizer.encode(text, add_bos=True, add_eos=True) for text in texts) if min_document_tokens is None \
        else joined_documents(tokenizer, texts, min_document_tokens)
    for ids in documents:
        if natural_budget is not None and natural + len(ids) > natural_budget:
            ids = ids[: natural_budget - natural]
        docs.append((ids, None))
        natural += len(ids)
        if natural_budget is not None and natural >= natural_budget:
            break
    rng = random.Random(seed)
    synthetic, n_synth = 0, 0
    synth_target = int(natural * synthetic_share / (1 - synthetic_share))
    # a list of lengths: every task at every length in turn (task fastest), e.g. a curriculum of 1K-8K needles
    lengths = _task_lengths(synthetic_length, seq_len)
    while synthetic_share > 0 and synthetic < synth_target:
        name = synthetic_tasks[n_synth % len(synthetic_tasks)]
        length = lengths[(n_synth // len(synthetic_tasks)) % len(lengths)]
        ids, trained = SYNTHETIC_TASKS[name](tokenizer, length, rng)
        if len(ids) > seq_len:  # the needles alone outgrow the sequence: it would be cut (see the module docstring)
            raise ValueError(f"dataset.synthetic_tasks: a {name} task needs {len(ids)} tokens with this tokenizer, "
                             f"more than seq_len={seq_len}; raise seq_len (and dataset.synthetic_length) or drop "
                             f"{name} from dataset.synthetic_tasks")
        docs.append((ids, trained))
        synthetic += len(ids)
        n_synth += 1
    rng.shuffle(docs)
    n_natural = len(docs) - n_synth
    docs, padding = _keep_tasks_whole(docs, seq_len, tokenizer.eos_id)
    total = natural + synthetic + padding
    if total < seq_len:
        raise ValueError(f"dataset: the source yields {total} tokens, fewer than one sequence of seq_len={seq_len}; "
                         f"add text or lower seq_len")
    tokens = torch.empty(total, dtype=torch.int32)
    trained = torch.ones(total, dtype=torch.bool)
    doc_start = torch.zeros(total, dtype=torch.bool)
    pos = 0
    for ids, mask in docs:
        tokens[pos: pos + len(ids)] = torch.tensor(ids, dtype=torch.int32)
        if mask is not None:
            trained[pos: pos + len(ids)] = torch.tensor(mask)
        doc_start[pos] = True
        pos += len(ids)
    stats = {"documents": n_natural, "synthetic_documents": n_synth,
             "natural_tokens": natural, "synthetic_tokens": synthetic, "padding_tokens": padding}
    return PackedDocuments(tokens, trained, doc_start, seq_len, stats)


def _keep_tasks_whole(docs: list, seq_len: int, pad_id: int, lookahead: int = 256) -> tuple[list, int]:
    """Reorder the shuffled ``docs`` so that no synthetic task (mask not None) crosses a multiple of ``seq_len``. Before
    a task that does not fit what is left of the current sequence, the gap is filled with (1) later tasks that fit
    (first fit among the next ``lookahead`` documents: tasks of several lengths pack tightly), (2) the next natural
    documents (cut where needed; the rest stays queued), (3) untrained padding (``pad_id``, a document of its own)
    once the natural text has run out. Returns (docs, padding tokens)."""
    naturals = [ids for ids, m in docs if m is None]
    placed = [False] * len(docs)
    out, pos, padding, k = [], 0, 0, 0  # k: the next natural document (or the rest of a cut one) to place

    def put(ids, mask):
        nonlocal pos
        out.append((ids, mask))
        pos += len(ids)
    for i, (ids, mask) in enumerate(docs):
        if placed[i]:
            continue
        if mask is None:
            if k < len(naturals):  # in order; fills may already have placed it
                put(naturals[k], None)
                k += 1
            continue
        room = -pos % seq_len
        if len(ids) > room and room:
            for j in range(i + 1, min(i + 1 + lookahead, len(docs))):
                if not placed[j] and docs[j][1] is not None and len(docs[j][0]) <= room:
                    put(*docs[j])
                    placed[j] = True
                    room = -pos % seq_len
                    if not room:
                        break
            while room and k < len(naturals):
                piece = naturals[k]
                put(piece[:room], None)
                if len(piece) > room:
                    naturals[k] = piece[room:]
                else:
                    k += 1
                room = -pos % seq_len
            if room:
                put([pad_id] * room, [False] * room)
                padding += room
        put(ids, mask)
    for ids in naturals[k:]:
        put(ids, None)
    return out, padding


# -- builders for configs -----------------------------------------------------------------------------------------------
def long_documents(tokenizer, seq_len: int, source: str = PYTHON_STDLIB, *, max_tokens: int | None = None,
                   synthetic_share: float = 0.0, synthetic_length: int | list[int] | None = None,
                   synthetic_tasks=("passkey", "multikey_needle"), seed: int = 0,
                   on_invalid_utf8: str = "error", min_document_tokens: int | None = None) -> PackedDocuments:
    """Packed long documents from local text files (``text_files`` explains ``source``); one file = one document, or
    with ``min_document_tokens`` consecutive files (sorted order) joined into documents of at least that many tokens.
    ``on_invalid_utf8``: ``"error"`` refuses a file that is not UTF-8 text, naming it; ``"skip"`` leaves it out and
    counts it in ``stats["skipped_files"]`` (names in ``stats["skipped_file_names"]``)."""
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise ValueError(f"dataset.on_invalid_utf8 must be one of {list(ON_INVALID_UTF8)}, got {on_invalid_utf8!r}")
    files = text_files(source)
    skipped: list[Path] = []
    # a file is read only as far as max_tokens can need (MAX_BYTES_PER_TOKEN)
    max_bytes = None if max_tokens is None else max_tokens * MAX_BYTES_PER_TOKEN
    ds = pack_documents(tokenizer, _read_files(files, on_invalid_utf8, skipped, max_bytes), seq_len,
                        max_tokens=max_tokens,
                        synthetic_share=synthetic_share, synthetic_length=synthetic_length,
                        synthetic_tasks=synthetic_tasks, seed=seed, min_document_tokens=min_document_tokens)
    ds.stats.update(skipped_files=len(skipped), skipped_file_names=[str(p) for p in skipped])
    return ds


def hf_long_documents(tokenizer, seq_len: int, name: str, *, split: str = "train", text_column: str = "text",
                      max_tokens: int | None = None, synthetic_share: float = 0.0,
                      synthetic_length: int | list[int] | None = None, synthetic_tasks=("passkey", "multikey_needle"),
                      seed: int = 0, **load_dataset_kwargs) -> PackedDocuments:
    """Packed long documents from a Hugging Face dataset (one row's ``text_column`` = one document), streamed so that
    only ``max_tokens`` worth of rows is read. Needs the ``datasets`` package and the hub (or its local cache)."""
    try:
        import datasets  # lazily: only users of the hub need it
    except ImportError as e:
        raise ImportError("hf_long_documents needs the 'datasets' package (pip install datasets)") from e
    rows = datasets.load_dataset(name, split=split, streaming=True, **load_dataset_kwargs)

    def texts():
        for row in rows:
            if text_column not in row:
                raise ValueError(f"dataset.text_column={text_column!r} is not a column of {name!r}; columns: "
                                 f"{sorted(row)}")
            yield row[text_column]

    return pack_documents(tokenizer, texts(), seq_len, max_tokens=max_tokens, synthetic_share=synthetic_share,
                          synthetic_length=synthetic_length, synthetic_tasks=synthetic_tasks, seed=seed)
