"""Text clients: the tokeniser's rule by hand, the text families' phi/head split and padding invariance, the AG News
reader on files in the real CSV format, BBC News learning with pFedLoRA, every method on a small text task (or its
one-line refusal), and bad text input at the CLI."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pfl import config
from pfl.algorithms import ALGORITHMS
from pfl.build import build
from pfl.data.text import encode, read_agnews, tokens, words
from pfl.errors import ConfigError, DataError
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.models import TEXT_FAMILIES, build_model, count_parameters

# a small text task: seeded pseudo-word documents, four clients of four different text families
TEXT_TASK = {
    "dataset": "synthetic_text", "partition": "pathological", "classes_per_client": 2, "num_clients": 4,
    "rounds": 1, "batch_size": 32, "seed": 0, "synthetic.num_samples": 240, "synthetic.num_classes": 4,
    "max_len": 24, "vocab_size": 512, "representation_dim": 32,
    "model_zoo": ["text_bow", "text_gru", "text_transformer1", "text_logreg"],
}
REFUSES_TEXT = {"pfedes": "recipe key 'method': pfedes trains a convolution G that maps an image"}


# ---------------------------------------------------------------- tokeniser

def test_words_are_lower_cased_runs_of_letters_digits_and_apostrophes():
    assert words("Don't STOP-now! Café £5") == ["don't", "stop", "now", "caf", "5"]
    assert tokens("Don't stop now", bigrams=True) == ["don't", "stop", "don't stop", "now", "stop now"]
    assert tokens("Don't stop now", bigrams=True, limit=3) == ["don't", "stop", "don't stop"]


def test_token_ids_follow_the_rule_by_hand():
    """id = 1 + crc32(utf-8) mod (V - 1), V = 100: crc32("don't") = 103882927 -> 50, "stop" 3109426870 -> 23,
    "don't stop" 3192364779 -> 88, "now" 2433526991 -> 72, "stop now" 2446670465 -> 9."""
    assert encode(["Don't stop now"], 100, 8, bigrams=True).tolist() == [[50, 23, 88, 72, 9, 0, 0, 0]]
    assert encode(["Don't stop now"], 100, 8, bigrams=False).tolist() == [[50, 23, 72, 0, 0, 0, 0, 0]]
    assert encode(["Don't stop now", ""], 100, 3, bigrams=True).tolist() == [[50, 23, 88], [0, 0, 0]]
    ids = encode(["a b c d e f g h"], 2, 20, bigrams=True)  # V = 2: every token is id 1
    assert ids.dtype == torch.int64 and ids.tolist() == [[1] * 15 + [0] * 5]


def test_token_ids_are_the_same_in_another_process_with_another_hash_seed():
    text = "The quick brown fox, the lazy dog's bone"
    code = f"from pfl.data.text import encode; print(encode([{text!r}], 1000, 16, True).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(encode([text], 1000, 16, True).tolist())


# ---------------------------------------------------------------- models

def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random token ids, each row padded with 0 after a random length in 1..length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    return ids.masked_fill(torch.arange(length)[None, :] >= lengths[:, None], 0)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_text_family_is_phi_to_nonnegative_d_then_a_linear_head(name):
    torch.manual_seed(0)
    model = build_model(name, (12,), 3, 16, vocab_size=50).eval()
    x = _ids(5, 12, 50)
    with torch.no_grad():
        h = model.phi(x)
        assert h.shape == (5, 16) and bool((h >= 0).all())
        assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (16, 3)
        assert torch.equal(model(x), model.head(h))


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_padding_does_not_change_the_representation(name):
    """The same texts with 6 more padding ids after them (a longer max_len) give the same phi."""
    torch.manual_seed(0)
    model = build_model(name, (14,), 3, 16, vocab_size=50).eval()
    x = _ids(6, 8, 50)
    with torch.no_grad():
        short, padded = model.phi(x), model.phi(F.pad(x, (0, 6)))
    assert torch.allclose(short, padded, atol=1e-6), (short - padded).abs().max()


def test_bag_is_the_sum_of_embeddings_over_the_square_root_of_the_token_count():
    torch.manual_seed(0)
    model = build_model("text_logreg", (4,), 2, 3, vocab_size=10)
    table = model.phi[0].embedding.weight
    x = torch.tensor([[3, 5, 3, 0]])
    assert torch.allclose(model.phi(x), torch.relu((2 * table[3] + table[5]) / 3 ** 0.5), atol=1e-6)
    assert torch.equal(table[0], torch.zeros(3))  # padding embeds to zero


def test_lstm_flops_are_counted_whether_texts_have_equal_lengths_or_not():
    """PyTorch runs equal-length batches as one fused kernel, counted by pfl's formula 2 x tokens x (4H x I + 4H x H)
    per forward (H = I = 64) and twice that backward; unequal lengths run as matrix products that torch counts
    itself, within 2% of the same formula (it skips a product or two of the initial state)."""
    model = build_model("text_lstm", (10,), 2, 8, vocab_size=30)
    lstm = 2 * (4 * 64 * 64 + 4 * 64 * 64)
    counted = []
    for x in (torch.randint(1, 30, (2, 10)), torch.tensor([[1] * 10, [2] * 9 + [0]])):
        counter = FlopCounterMode(display=False)
        with counter:
            F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        counted.append(counter.get_total_flops())
    linear = 3 * 2 * 2 * (64 * 8 + 8 * 2)  # the projection and the head, forward and backward, 2 samples
    assert counted[0] == 3 * 20 * lstm + linear
    assert counted[1] == pytest.approx(3 * 19 * lstm + linear, rel=0.02)


# ---------------------------------------------------------------- data sets

AGNEWS_TRAIN = ('"3","Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s '
                'dwindling\\band of ultra-cynics, are seeing green again."\n'
                '"1","He said ""no"", twice","Comma, and ""quotes"" inside"\n')
AGNEWS_TEST = '"4","Sci, Tech","New chips"\n"2","Goal!","Late winner"\n'


def _write_agnews(root):
    folder = root / "ag_news_csv"
    folder.mkdir()
    (folder / "train.csv").write_text(AGNEWS_TRAIN, encoding="utf-8")
    (folder / "test.csv").write_text(AGNEWS_TEST, encoding="utf-8")


def test_agnews_reader_on_the_real_csv_format(tmp_path):
    _write_agnews(tmp_path)
    texts, labels = read_agnews(tmp_path)
    assert labels == [2, 0, 3, 1]  # class index 1..4 -> 0..3, train.csv then test.csv
    assert texts[0] == ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's "
                        "dwindling\\band of ultra-cynics, are seeing green again.")
    assert texts[1] == 'He said "no", twice Comma, and "quotes" inside'
    cfg = config.resolve({"dataset": "agnews", "data_dir": str(tmp_path), "max_len": 6, "vocab_size": 100,
                          "text_bigrams": False, "model_zoo": "htfe-txt-2", "num_clients": 2, "partition": "iid"})
    from pfl.data import load_dataset

    data = load_dataset(cfg)
    assert data.num_classes == 4 and data.y.tolist() == [2, 0, 3, 1] and data.x.shape == (4, 6)
    assert data.x[1].tolist() == encode(['He said "no", twice Comma, and "quotes" inside'], 100, 6, False)[0].tolist()


def test_agnews_archive_is_extracted_and_a_bad_row_is_named(tmp_path):
    with tarfile.open(tmp_path / "ag_news_csv.tar.gz", "w:gz") as tar:
        for name, text in (("train.csv", AGNEWS_TRAIN), ("test.csv", '"5","x","y"\n')):
            blob = text.encode()
            info = tarfile.TarInfo(f"ag_news_csv/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=r"test.csv row 1 is not \"class 1..4\""):
        read_agnews(tmp_path)
    assert (tmp_path / "ag_news_csv" / "train.csv").read_text() == AGNEWS_TRAIN


def test_bbc_news_is_the_whole_corpus_in_five_classes():
    cfg, _ = config.load("bbc-news", ["max_len=16"])
    from pfl.data import load_dataset

    data = load_dataset(cfg)
    assert data.x.shape == (2225, 16) and data.x.dtype == torch.int64 and data.vocab_size == 16384
    assert data.y.bincount().tolist() == [510, 386, 417, 511, 401]  # business .. tech
    assert int(data.x.min()) >= 0 and int(data.x.max()) < 16384


@pytest.mark.slow
def test_bbc_news_with_pfedlora_learns_well_above_chance():
    """Four IID clients of the two bag families (the fastest on a CPU), three rounds: 5 classes, chance 20%."""
    cfg, _ = config.load("bbc-news", ["partition=iid", "num_clients=4", "rounds=3", "max_len=64", "lr=0.2",
                                      "local_epochs=3", "model_zoo=[\"text_bow\", \"text_logreg\"]"])
    setup = build(cfg)
    run = FederatedRun.local(cfg, setup.clients, setup.architectures, setup.algorithm, MemoryStore(),
                             make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    records = [run.run_round() for _ in range(cfg.rounds)]
    assert records[-1]["acc_mean"] > 0.5, [r["acc_mean"] for r in records]  # 0.68 when written


# ---------------------------------------------------------------- every method

@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_runs_a_round_on_text_or_refuses_it_in_one_line(method):
    over = {**TEXT_TASK, "method": method}
    if method == "fedavg":
        over["model_setting"] = "homogeneous"
    if method in REFUSES_TEXT:
        with pytest.raises(ConfigError) as info:
            config.resolve(over)
        assert REFUSES_TEXT[method] in str(info.value) and "\n" not in str(info.value)
        return
    cfg = config.resolve(over)
    setup = build(cfg)
    run = FederatedRun.local(cfg, setup.clients, setup.architectures, setup.algorithm, MemoryStore(),
                             make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    record = run.run_round()
    assert record["clients_dropped"] == 0 and 0.0 <= record["acc_mean"] <= 1.0
    assert torch.isfinite(torch.tensor(record["train_loss"]))


def test_shared_models_default_to_a_text_family_on_text():
    cfg = config.resolve({**TEXT_TASK, "method": "fml"})
    algorithm = build(cfg).algorithm
    meme = algorithm.make_client("text_gru").meme
    assert meme.arch == "text_bow"
    assert count_parameters(meme) == count_parameters(build_model("text_bow", (24,), 4, 32, vocab_size=512))


# ---------------------------------------------------------------- the CLI

BAD_TEXT = [
    (["train", "--recipe", "agnews", "--set", "data_dir=/nonexistent/x"],
     "dataset 'agnews': train.csv and test.csv not found in /nonexistent/x/ag_news_csv"),
    (["train", "--recipe", "bbc-news", "--set", "max_len=0"], "recipe key 'max_len': must be an integer >= 1"),
    (["train", "--recipe", "bbc-news", "--set", "vocab_size=1"], "recipe key 'vocab_size': must be an integer >= 2"),
    (["train", "--recipe", "bbc-news", "--set", "model_zoo=[\"text_cnn\"]"],
     "recipe key 'model_zoo': unknown model 'text_cnn'"),
    (["train", "--recipe", "bbc-news", "--set", "model_zoo=[\"text_bow\", \"cnn1\"]"],
     "recipe key 'model_zoo': model 'cnn1' reads images and bbc-news is a text data set"),
    (["train", "--recipe", "smoke", "--set", "model_zoo=htfe-txt-2"],
     "recipe key 'model_zoo': model 'text_bow' reads token ids and synthetic is an image data set"),
    (["train", "--recipe", "bbc-news", "--set", "augment=true"],
     "recipe key 'augment': random crop and flip are image augmentations"),
    (["train", "--recipe", "bbc-news", "--set", "method=pfedes"], REFUSES_TEXT["pfedes"]),
    (["train", "--recipe", "bbc-news", "--set", "method=fml", "--set", "fml.shared_model=cnn5"],
     "recipe key 'fml.shared_model': model 'cnn5' reads images and bbc-news is a text data set"),
    (["partition", "--recipe", "agnews", "--set", "data_dir=/nonexistent/x"], "dataset 'agnews'"),
]


@pytest.mark.parametrize("args, message", BAD_TEXT, ids=[" ".join(a[2:]) for a, _ in BAD_TEXT])
def test_bad_text_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if args[0] == "train":
        args = args + ["--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("*.png")) and not list(tmp_path.iterdir())


def test_models_lists_the_text_zoo_with_measured_sizes(monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["models", "--recipe", "bbc-news"], terminal_width=200)
    assert res.exit_code == 0, res.stdout
    assert "token ids [128] (vocabulary 16,384), 5 classes, d=128" in res.stdout
    for name in ("text_bow", "text_lstm", "text_bilstm", "text_transformer2", "text_logreg", "text_gru"):
        line = next(line for line in res.stdout.splitlines() if f" {name} " in line)
        assert f"{count_parameters(build_model(name, (128,), 5, 128, vocab_size=16384)):,}" in line, line
        assert "htfe-txt-6" in line
    assert "cnn1" not in res.stdout


def test_partition_of_the_bbc_news_recipe(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["partition", "--recipe", "bbc-news", "--out", str(tmp_path / "p.png")],
                             terminal_width=200)
    assert res.exit_code == 0, res.stdout
    assert (tmp_path / "p.png").stat().st_size > 0 and "5 in all" in res.stdout


def test_the_group_all_leaves_out_a_method_that_refuses_text_and_says_why():
    """`pfl compare --methods all` on a text recipe runs every method that can run there and names the one left
    out with its reason; naming the refusing method on its own is still an error."""
    from pfl import compare

    sets = [f"{k}={json.dumps(v)}" for k, v in TEXT_TASK.items() if k != "seed"]
    kept, notes = compare.applicable("smoke", sets, compare.parse_entries("all"))
    assert [e.method for e in kept] == [m for m in compare.METHOD_GROUPS["all"] if m != "pfedes"]
    assert len(notes) == 1 and notes[0].startswith("pfedes left out: " + REFUSES_TEXT["pfedes"])
    kept, notes = compare.applicable("smoke", sets, compare.parse_entries("pfedes, standalone"))
    assert [e.method for e in kept] == ["pfedes", "standalone"] and notes == []
    with pytest.raises(ConfigError, match="pfedes trains a convolution"):
        compare.plan("smoke", sets, kept, 1)
