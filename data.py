"""
Corpora, tokenizers and batches.

Three kinds of data stand behind one interface (get_batch, eval_batches,
state_dict), so train.py never asks which one it has:

  TokenStream  a text as one long token stream, 90/10 contiguous split,
               random windows of block_size tokens (nanoGPT's way).
  SentenceSet  one line of the text per sequence, <BOS> ... <EOS>, padded
               with <PAD> to block_size; 80/20 split of the shuffled lines
               (the seed report's way, --sentences).
  RecallTask   synthetic multi-query associative recall (--data recall):
               key-value pairs, then queries that repeat earlier keys.

Targets equal to IGNORE (-1) are not scored: padding, and every position of
a recall sequence but the answers.

Corpora: 'shakespeare' (Tiny Shakespeare, shipped in data/ so that the first run
needs no network) and 'seed-sentences' (the seed report's own 30 sentences, split
the report's way), each checked by size and SHA-256 and downloaded again into data/
when missing or damaged; or the path of any UTF-8 text file.
Tokenizers: 'char' (every distinct character) or 'word' (lower-cased
whitespace words: the most frequent ones plus <PAD> <UNK> <BOS> <EOS>).

    python data.py                       # corpus statistics of Tiny Shakespeare
    python data.py --data my.txt --tokenizer word
"""

import argparse
import hashlib
import random
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError
from newllm import IGNORE  # the target value every model's loss skips
from run_folder import atomic_write

CACHE_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Corpus:
    """A public text the project keeps in data/, checked; fetched from `url` when missing or damaged."""
    title: str
    url: str
    size: int      # bytes
    sha256: str
    file: str      # its name in data/

    @property
    def path(self):
        return CACHE_DIR / self.file


CORPORA = {
    "shakespeare": Corpus("Tiny Shakespeare",
                          "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                          1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                          "tinyshakespeare.txt"),
    # the 30 sentences the seed report trained on (its repository, data/sample_texts.txt, at the report's commit)
    "seed-sentences": Corpus("the seed report's 30 sentences",
                             "https://raw.githubusercontent.com/rato-tokyo/new-llm/"
                             "270b4164d3337536c9a67f69a4b1e83df8235d62/data/sample_texts.txt",
                             731, "3cda6ac0f0f3f5c94a9c4a2f3df971811fea1e96a72ac9edaf88107a02b0a7b5",
                             "seed-sentences.txt"),
}

SPECIALS = ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]  # word ids 0-3, as in the seed report
PAD, UNK, BOS, EOS = range(4)

# -----------------------------------------------------------------------------
# reading a corpus


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def download(corpus, attempts=3):
    """Fetch a corpus into the cache, verified; a bad download is never kept."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    reason = "unknown error"
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(corpus.url, timeout=30) as response:
                data = response.read()
            if len(data) != corpus.size or _sha256(data) != corpus.sha256:
                reason = f"got {len(data):,} bytes that fail the size/checksum test"
            else:
                atomic_write(corpus.path, lambda f: f.write(data))  # the cache is whole or absent
                return
        except OSError as error:  # URLError, timeouts and resets are all OSErrors
            reason = str(getattr(error, "reason", error))
        print(f"download attempt {attempt}/{attempts} failed: {reason}")
        time.sleep(attempt)
    raise UserError(f"could not download {corpus.title} from {corpus.url} ({reason}); "
                    f"save it as {corpus.path} or pass --data PATH")


def read_cached(corpus):
    """The cached corpus, downloaded (again) when it is missing or corrupt."""
    if corpus.path.is_file():
        data = corpus.path.read_bytes()
        if len(data) == corpus.size and _sha256(data) == corpus.sha256:
            return data.decode("utf-8")
        print(f"{corpus.path} is incomplete or corrupt; downloading it again")
    download(corpus)
    return corpus.path.read_text(encoding="utf-8")


def read_text_file(path):
    """A user's corpus: it must exist and be non-empty UTF-8 text."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if not path.is_file():
        raise UserError(f"--data {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    if b"\x00" in data[:65536]:
        raise UserError(f"{path} looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {error.start})") from None
    if not text.strip():
        raise UserError(f"{path} is empty or holds only whitespace")
    # Windows line endings (Project Gutenberg files have them) become plain newlines, so that
    # "\r" takes neither a vocabulary entry nor a position in every line.
    return text.replace("\r\n", "\n")


def read_corpus(source):
    """A corpus name ('shakespeare', 'seed-sentences') or a path -> text."""
    return read_cached(CORPORA[source]) if source in CORPORA else read_text_file(source)


# -----------------------------------------------------------------------------
# tokenizers


class CharTokenizer:
    """Every distinct character of the corpus is one token."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise UserError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [self.index[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def start_ids(self):
        """Where generation starts without a prompt: a line break, if the text has any."""
        return [self.index.get("\n", 0)]

    def state_dict(self):
        return {"kind": "char", "tokens": self.chars}


class WordTokenizer:
    """Lower-cased whitespace words; ids 0-3 are <PAD> <UNK> <BOS> <EOS>."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.index = {w: i for i, w in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)

    @classmethod
    def from_text(cls, text, vocab_size, fill=False):
        """The vocab_size - 4 most frequent words. fill: keep vocab_size entries even when the text has fewer
        words (the seed report's tokenizer did: its models' embedding and head have vocab_size rows)."""
        if vocab_size <= len(SPECIALS):
            raise UserError(f"--vocab-size must exceed {len(SPECIALS)} (the special tokens)")
        counts = Counter(text.lower().split())
        # most frequent first, ties broken alphabetically so the vocabulary is reproducible
        words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(SPECIALS)]
        unused = [f"<unused {i}>" for i in range(vocab_size - len(SPECIALS) - len(words))] if fill else []
        return cls(SPECIALS + words + unused)  # an entry with a space in it is never a word of the text

    def encode(self, text):
        return [self.index.get(w, UNK) for w in text.lower().split()]

    def decode(self, ids):
        return " ".join(self.tokens[i] for i in ids if i != PAD)

    def start_ids(self):
        return [BOS]

    def state_dict(self):
        return {"kind": "word", "tokens": self.tokens}


class SymbolTokenizer:
    """The recall task's tokens are bare numbers: 0 is filler, then keys, then values."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise UserError("a recall prompt is a list of token numbers, e.g. '5 130 7 141 5'") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise UserError(f"recall tokens are numbers from 0 to {self.vocab_size - 1}")
        return ids

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def start_ids(self):
        return [0]

    def state_dict(self):
        return {"kind": "symbol", "vocab_size": self.vocab_size}


def tokenizer_from_state(state):
    if state["kind"] == "symbol":
        return SymbolTokenizer(state["vocab_size"])
    return {"char": CharTokenizer, "word": WordTokenizer}[state["kind"]](state["tokens"])


# -----------------------------------------------------------------------------
# batches: one long stream


class TokenStream:
    """A corpus as one token stream; batches are random windows of block_size tokens."""

    def __init__(self, ids, tokenizer, block_size, seed):
        self.tokenizer, self.block_size = tokenizer, block_size
        ids = torch.tensor(ids, dtype=torch.long)
        n_train = int(0.9 * len(ids))  # contiguous 90/10 split: validation is unseen text
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}
        for split, data in self.splits.items():
            if len(data) <= block_size:
                raise UserError(f"the corpus is too short: its {split} split has {len(data)} tokens, "
                                f"not more than one block of {block_size} (lower --block-size or use a longer text)")
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_seed = seed + 1_000_003  # evaluation always reads the same windows

    def _windows(self, split, batch_size, generator):
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        x = torch.stack([data[s : s + self.block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([data[s + 1 : s + 1 + self.block_size] for s in starts.tolist()])  # (B, T)
        return x, y

    def get_batch(self, batch_size):
        """The next training batch (x, y), each (B, T)."""
        return self._windows("train", batch_size, self.generator)

    def lane_batch(self, batch_size, step):
        """Training batch `step` for --carry-state: (x, y, fresh). The training text is cut into batch_size
        stretches, one per row (a lane), and each row reads its stretch window after window, so that a model
        can start every window from the state the one before ended in. fresh: the lanes start over (a new
        pass over the text, or the first batch), and the state goes back to its start."""
        data, T = self.splits["train"], self.block_size
        stretch = (len(data) - 1) // batch_size  # tokens per lane; the last one's target is the next token
        windows = stretch // T
        if windows < 2:
            raise UserError(f"--carry-state needs at least 2 windows of {T} tokens per batch row: "
                            f"{len(data):,} training tokens do not make {batch_size} lanes of {2 * T}")
        starts = [row * stretch + (step % windows) * T for row in range(batch_size)]
        x = torch.stack([data[s : s + T] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1 : s + 1 + T] for s in starts])  # (B, T)
        return x, y, step % windows == 0

    def eval_batches(self, split, batch_size, count):
        generator = torch.Generator().manual_seed(self.eval_seed)
        return [self._windows(split, batch_size, generator) for _ in range(count)]

    def steps_per_epoch(self, batch_size):
        return max(1, len(self.splits["train"]) // (batch_size * self.block_size))

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def summary(self):
        return (f"{len(self.splits['train']):,} train tokens, {len(self.splits['val']):,} val tokens, "
                f"vocabulary {self.tokenizer.vocab_size:,}")


# -----------------------------------------------------------------------------
# batches: one sentence (line) per sequence, the seed report's way


def shuffled_lines(text, split_seed=42):
    """This project's split of a text's lines: shuffled with torch (split_seed), first 80% train."""
    lines = [line for line in text.split("\n") if line.strip()]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_train = int(0.8 * len(lines))
    return [lines[i] for i in order[:n_train]], [lines[i] for i in order[n_train:]]


def report_lines(text):
    """The seed report's own split (its dataset code): the stripped non-empty lines, random.seed(42),
    random.shuffle, first int(0.8 * n) train; its vocabulary then comes from the training lines only,
    filled up to --vocab-size entries (1,000) like the report's."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    random.Random(42).shuffle(lines)  # what random.seed(42); random.shuffle(lines) does
    n_train = int(0.8 * len(lines))
    return lines[:n_train], lines[n_train:]


class SentenceSet:
    """Each line is <BOS> w1 .. wn <EOS>, read up to block_size tokens and padded.

    Inputs x are the first block_size tokens, targets y the next ones; padding
    targets are IGNORE. Longer lines are truncated (the report's max_length).
    The lines come split in two (shuffled_lines or report_lines); training visits
    the training lines epoch by epoch in a fresh random order.
    """

    def __init__(self, train_lines, val_lines, tokenizer, block_size, seed):
        self.tokenizer, self.block_size = tokenizer, block_size
        if not isinstance(tokenizer, WordTokenizer):
            raise UserError("--sentences needs --tokenizer word (it uses <BOS>, <EOS> and <PAD>)")
        self.truncated, self.unknown, self.words = 0, 0, 0
        self.splits = {}
        for split, lines in (("train", train_lines), ("val", val_lines)):
            if not lines:
                raise UserError(f"the corpus has {len(train_lines) + len(val_lines)} non-empty lines: "
                                "too few for an 80/20 split")
            self.splits[split] = self._pad(lines)
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_seed = seed + 1_000_003
        self.order, self.cursor = torch.randperm(len(train_lines), generator=self.generator), 0

    def _pad(self, lines):
        T = self.block_size
        x = torch.full((len(lines), T), PAD, dtype=torch.long)
        y = torch.full((len(lines), T), IGNORE, dtype=torch.long)
        for row, line in enumerate(lines):
            ids = [BOS] + self.tokenizer.encode(line) + [EOS]
            self.truncated += len(ids) > T + 1
            self.unknown += ids.count(UNK)
            self.words += len(ids) - 2
            ids = ids[: T + 1]
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, : len(ids) - 1] = torch.tensor(ids[1:])
        return x, y  # (N, T) each

    def get_batch(self, batch_size):
        x, y = self.splits["train"]
        rows = []
        while len(rows) < batch_size:  # walk through the epoch's order, reshuffle at its end
            if self.cursor == len(self.order):
                self.order, self.cursor = torch.randperm(len(x), generator=self.generator), 0
            take = self.order[self.cursor : self.cursor + batch_size - len(rows)]
            rows.extend(take.tolist())
            self.cursor += len(take)
        return x[rows], y[rows]

    def eval_batches(self, split, batch_size, count):
        x, y = self.splits[split]
        if batch_size * count >= len(x):  # a small split is read whole, once: the exact loss
            return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        generator = torch.Generator().manual_seed(self.eval_seed)
        rows = [torch.randint(len(x), (batch_size,), generator=generator) for _ in range(count)]
        return [(x[r], y[r]) for r in rows]

    def steps_per_epoch(self, batch_size):
        return -(-len(self.splits["train"][0]) // batch_size)  # ceil: the last batch may wrap

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"], state["cursor"]

    def summary(self):
        n_train, n_val = len(self.splits["train"][0]), len(self.splits["val"][0])
        return (f"{n_train:,} train lines, {n_val:,} val lines, vocabulary {self.tokenizer.vocab_size:,} "
                f"({100 * self.unknown / max(self.words, 1):.1f}% of words are <UNK>), "
                f"{self.truncated} lines truncated to {self.block_size} tokens")


# -----------------------------------------------------------------------------
# batches: synthetic multi-query associative recall (Zoology, Arora et al. 2023)


class RecallTask:
    """Sequences of `block_size` tokens that test whether a model can look one fact up.

        k1 v1 k2 v2 ... kN vN  0 0 kq vq 0 ... kq' vq' 0 ...
        |---- N pairs -----|  |-- Q queries at random later slots --|

    Keys come from 1..V/2-1 and are distinct within a sequence, values from
    V/2..V-1, 0 is filler. Each query repeats an earlier key; its target (the
    next token) is that key's value, and no other position is scored. Queries
    sit at random slots after the pairs and ask random pairs, so both recent
    and distant facts are asked. Each batch draws its N from `pairs`: training
    on a mix of easy and hard sequences is how Zoology (Arora et al. 2023)
    trains MQAR, and the easy ones get models past the long initial plateau.
    The training stream is endless; evaluation draws from its own seed.
    """

    def __init__(self, vocab_size, pairs, num_queries, block_size, seed):
        self.pairs = tuple(pairs) if isinstance(pairs, (list, tuple)) else (pairs,)
        self.block_size, self.num_queries = block_size, num_queries
        self.num_keys = vocab_size // 2 - 1
        if min(self.pairs) < 1 or num_queries < 1:
            raise UserError("--recall-pairs and --recall-queries must be at least 1")
        if max(self.pairs) > self.num_keys:
            raise UserError(f"{max(self.pairs)} distinct keys need --recall-vocab of at least {2 * max(self.pairs) + 2}")
        if self.query_slots(max(self.pairs)) < 1:
            raise UserError(f"{max(self.pairs)} pairs and their queries do not fit in {block_size} tokens "
                            f"(raise --block-size to at least {2 * max(self.pairs) + 1})")
        self.tokenizer = SymbolTokenizer(vocab_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_seed = seed + 1_000_003

    def query_slots(self, num_pairs):
        return (self.block_size + 1 - 2 * num_pairs) // 2

    def sample(self, batch_size, generator):
        N = self.pairs[torch.randint(len(self.pairs), (1,), generator=generator).item()]
        B, T = batch_size, self.block_size
        Q = min(self.num_queries, self.query_slots(N))
        half = self.tokenizer.vocab_size // 2
        keys = torch.rand(B, self.num_keys, generator=generator).argsort(dim=1)[:, :N] + 1  # (B, N) distinct
        values = torch.randint(half, 2 * half, (B, N), generator=generator)  # (B, N)
        seq = torch.zeros(B, T + 1, dtype=torch.long)
        seq[:, 0 : 2 * N : 2], seq[:, 1 : 2 * N : 2] = keys, values
        asked = torch.randint(N, (B, Q), generator=generator)  # which pair each query asks
        slots = torch.rand(B, self.query_slots(N), generator=generator).argsort(dim=1)[:, :Q]
        key_pos = 2 * N + 2 * slots  # (B, Q) position of each query's key
        seq.scatter_(1, key_pos, keys.gather(1, asked))
        seq.scatter_(1, key_pos + 1, values.gather(1, asked))
        x = seq[:, :T]
        y = torch.full((B, T), IGNORE, dtype=torch.long)
        y.scatter_(1, key_pos, values.gather(1, asked))  # only the answers are scored
        return x, y

    def get_batch(self, batch_size):
        return self.sample(batch_size, self.generator)

    def eval_batches(self, split, batch_size, count):
        # train and val draw from differently seeded streams of fresh sequences
        generator = torch.Generator().manual_seed(self.eval_seed + (split == "val"))
        return [self.sample(batch_size, generator) for _ in range(count)]

    def steps_per_epoch(self, batch_size):
        raise UserError("the recall task is an endless stream: use --max-iters, not --epochs")

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def summary(self):
        return (f"recall: {'/'.join(map(str, self.pairs))} pairs, up to {self.num_queries} queries, "
                f"length {self.block_size}, vocabulary {self.tokenizer.vocab_size}")


# -----------------------------------------------------------------------------
# one entry point for the scripts


def load_dataset(data="shakespeare", tokenizer="char", vocab_size=1000, block_size=128, sentences=False,
                 seed=1337, recall_vocab=256, recall_pairs=(8,), recall_queries=8):
    """Everything train.py needs from --data ... flags: a dataset with .tokenizer, .identity and batches.

    identity says which text the batches come from (its length and SHA-256, or the recall
    task's settings); a resumed run checks it, so it never silently trains on another text.
    """
    if block_size < 1:
        raise UserError("--block-size must be positive")
    if data == "recall":
        dataset = RecallTask(recall_vocab, recall_pairs, recall_queries, block_size, seed)
        dataset.identity = {"data": "recall", "vocab": recall_vocab, "pairs": list(dataset.pairs),
                            "queries": recall_queries}
        return dataset
    text = read_corpus(data)
    if tokenizer not in ("char", "word"):
        raise UserError(f"unknown tokenizer '{tokenizer}' (choose char or word)")
    if sentences:  # the report's own sentences are split the report's way
        train_lines, val_lines = report_lines(text) if data == "seed-sentences" else shuffled_lines(text)
        vocabulary_text = "\n".join(train_lines) if data == "seed-sentences" else text
    else:
        vocabulary_text = text
    if tokenizer == "char":
        tok = CharTokenizer.from_text(vocabulary_text)
    else:
        tok = WordTokenizer.from_text(vocabulary_text, vocab_size, fill=data == "seed-sentences")
    if sentences:
        dataset = SentenceSet(train_lines, val_lines, tok, block_size, seed)
    else:
        dataset = TokenStream(tok.encode(text), tok, block_size, seed)
    dataset.identity = {"data": corpus_name(data), "chars": len(text), "sha256": _sha256(text.encode("utf-8"))}
    return dataset


def corpus_name(data):
    return data if data in CORPORA or data == "recall" else Path(data).name


def describe(data, dataset):
    """The one line of corpus statistics the scripts print."""
    return f"data: {corpus_name(data)}: {dataset.summary()}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print a corpus's statistics.")
    parser.add_argument("--data", default="shakespeare", help="'shakespeare', 'seed-sentences', 'recall' or a text file")
    parser.add_argument("--tokenizer", default="char", help="char or word")
    parser.add_argument("--vocab-size", type=int, default=1000, help="word vocabulary size, specials included")
    parser.add_argument("--sentences", action="store_true", help="one line per sequence")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    args = parser.parse_args()
    try:
        ds = load_dataset(args.data, args.tokenizer, args.vocab_size, args.block_size, args.sentences)
    except UserError as error:
        raise SystemExit(f"error: {error}")
    print(describe(args.data, ds))
