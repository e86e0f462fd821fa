"""Text families of the zoo: token ids (B, max_len) int64, 0 = padding at the end -> phi -> R^d (after its
ReLU) -> head Linear(d, C), the same split as the image families, so every method that works on phi and the
head works on text unchanged.

Widths are small (embeddings and hidden states of 64) so that a federation of them trains on a CPU. Every
family ignores padding exactly: bags average the non-padding embeddings, recurrent families read packed
sequences up to each text's length, transformers mask padding as keys and average only the real tokens. So a
text's representation does not depend on how much padding follows it (tested).

- text_bow: fastText-like bag of embeddings (width 64), mean of the non-padding ones, Linear(64, d), ReLU.
- text_logreg: a bag of embeddings of width d, ReLU: the logistic-regression-like bag (HtFLlib's
  TextLogisticRegression) on which the head is the whole classifier.
- text_lstm / text_bilstm / text_gru: one recurrent layer of 64 (two directions for the BiLSTM) up to the
  text's own length, the maximum of its outputs over the positions, Linear(64 or 128, d), ReLU.
- text_transformer1..4: 1-4 encoder layers (width 64, 4 heads, feed-forward 128, dropout 0.1, pre-norm),
  learned positions, padding masked, mean over the real tokens, Linear(64, d), ReLU.

A model is a text model exactly when its name starts with "text_" (`is_text_model`); a text model needs the
data set's `vocab_size` (`build_model(..., vocab_size=)`), an image model an image.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pfl.models.zoo import MODEL_REGISTRY, ZOOS, SplitModel, split_architecture

WIDTH = 64  # embedding and hidden width of every family but text_logreg (whose embedding is d wide)
ATTENTION_HEADS = 4
FEED_FORWARD = 128
DROPOUT = 0.0  # transformer layers
EMBEDDING_STD = 0.1  # bags' embeddings (see Bag)


class Bag(nn.Module):
    """The sum of the non-padding token embeddings divided by the square root of their number (zeros for a text
    without tokens), embeddings drawn from N(0, 0.1^2).

    fastText averages; but with a mean every embedding's gradient is divided by the text's length (128 tokens:
    128 times smaller than the head's), and plain SGD at one learning rate for the whole model hardly moves the
    table: on bbc-news (max_len 128, lr 0.05, 5 epochs, centralised) a mean bag reached 43% test accuracy, this
    bag 82%. The sqrt keeps the bag's scale independent of the length for random embeddings."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, width, mode="sum", padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_STD)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = (ids != 0).sum(dim=1, keepdim=True).clamp_min(1)
        return self.embedding(ids) / tokens.to(self.embedding.weight.dtype).sqrt()


class Recurrent(nn.Module):
    """An LSTM or GRU layer over the embeddings up to each text's length, and the maximum of its outputs over the
    text's positions, per unit (both directions' outputs concatenated when bidirectional; the pooling of
    InferSent's BiLSTM-max). A text without tokens is read as one padding token.

    Max pooling rather than the final state, which HtFLlib's LSTMNet and GRUNet read: every position gets a
    gradient, not only the last. Measured with SGD (lr 0.05, momentum 0.9, 3 epochs, centralised) on pfl's
    synthetic text, an LSTM's test accuracy went from 44% (final state) to 97%; on bbc-news (5 epochs) from 27%
    to 47%."""

    def __init__(self, vocab_size: int, cell: str, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, WIDTH, padding_idx=0)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(WIDTH, WIDTH, batch_first=True, bidirectional=bidirectional)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        outputs, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, padding_value=-math.inf)
        return outputs.max(dim=1).values


class Encoder(nn.Module):
    """Transformer encoder layers over embeddings plus learned positions; padding masked as keys; the mean
    of the real tokens' outputs. The first position always counts, so an empty text has a defined mean."""

    def __init__(self, vocab_size: int, max_len: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, WIDTH, padding_idx=0)
        self.position = nn.Parameter(torch.randn(max_len, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, ATTENTION_HEADS, FEED_FORWARD, DROPOUT, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == 0
        padding[:, 0] = False
        h = self.encoder(self.embedding(ids) + self.position[:ids.shape[1]], src_key_padding_mask=padding)
        real = (~padding).unsqueeze(-1).to(h.dtype)
        return (h * real).sum(dim=1) / real.sum(dim=1)


def _text_extractor(name: str, vocab_size: int, max_len: int, d: int) -> tuple[nn.Module, int]:
    """The family's text encoder and its output width."""
    if name == "text_bow":
        return Bag(vocab_size, WIDTH), WIDTH
    if name == "text_logreg":
        return Bag(vocab_size, d), d
    if name in ("text_lstm", "text_bilstm", "text_gru"):
        directions = 2 if name == "text_bilstm" else 1
        return Recurrent(vocab_size, "gru" if name == "text_gru" else "lstm", directions == 2), WIDTH * directions
    return Encoder(vocab_size, max_len, int(name.removeprefix("text_transformer"))), WIDTH


def build_text(name: str, in_shape: tuple[int, ...], num_classes: int, d: int = 500, vocab_size: int = 0) -> SplitModel:
    """A text family split into phi (token ids (B, max_len) -> R^d, then ReLU) and head Linear(d, C)."""
    if vocab_size < 2 or len(in_shape) != 1:
        raise ValueError(f"{name}: a text model reads token ids of shape (max_len,) from a vocabulary of at least "
                         f"2 ids; got input {tuple(in_shape)} and vocab_size {vocab_size}")
    encoder, width = _text_extractor(name, vocab_size, in_shape[0], d)
    projection = [] if name == "text_logreg" else [nn.Linear(width, d)]
    return SplitModel(nn.Sequential(encoder, *projection, nn.ReLU()), nn.Linear(d, num_classes), name, d)


TEXT_FAMILIES = ("text_bow", "text_logreg", "text_lstm", "text_bilstm", "text_gru",
                 *(f"text_transformer{layers}" for layers in range(1, 5)))

# Named zoos: HtFLlib's text settings (system/main.py) with pfl's small models, in its order.
TEXT_ZOOS: dict[str, list[str]] = {
    "htfe-txt-2": ["text_bow", "text_logreg"],  # HtFE-txt-2: fastText, TextLogisticRegression
    "htfe-txt-4": ["text_bow", "text_logreg", "text_lstm", "text_bilstm"],  # HtFE-txt-4
    # HtFE-txt-6: fastText, LSTM, BiLSTM, a 2-layer transformer, TextLogisticRegression, GRU
    "htfe-txt-6": ["text_bow", "text_lstm", "text_bilstm", "text_transformer2", "text_logreg", "text_gru"],
    # HtFE-txt-5-1's ladder of transformer depths (1, 2, 4, 8, 16 layers there) at CPU size: 1 to 4 layers
    "text-depth-4": [f"text_transformer{layers}" for layers in range(1, 5)],
}

MODEL_REGISTRY.update(dict.fromkeys(TEXT_FAMILIES, build_text))
ZOOS.update(TEXT_ZOOS)


def _fused_lstm_flops(input_shape, weight_ih_shape, weight_hh_shape, *args, **kwargs) -> int:
    """Matrix-product FLOPs of one LSTM layer over a sequence: 2 x tokens x (4H x I + 4H x H)."""
    tokens = math.prod(input_shape) // weight_ih_shape[1]
    return 2 * tokens * (math.prod(weight_ih_shape) + math.prod(weight_hh_shape))


def _fused_lstm_backward_flops(input_shape, weight_ih_shape, weight_hh_shape, *args, **kwargs) -> int:
    """Backward: the gradients of the inputs and of the weights, twice the forward products."""
    return 2 * _fused_lstm_flops(input_shape, weight_ih_shape, weight_hh_shape)


def _count_fused_lstm() -> None:
    """On the CPU, PyTorch runs an LSTM layer over a batch whose texts have equal lengths as one oneDNN kernel
    (aten.mkldnn_rnn_layer) for which torch's FLOP counter has no formula, and over unequal lengths as matrix
    products it counts: the same layer would cost 0 FLOPs on one batch and millions on the next. pfl's cost
    accounting (pfl.federation.costs) and `pfl models` count it the same way on both paths with this formula."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    ops = torch.ops.aten
    if hasattr(ops, "mkldnn_rnn_layer") and ops.mkldnn_rnn_layer not in flop_registry:
        register_flop_formula(ops.mkldnn_rnn_layer)(_fused_lstm_flops)
        register_flop_formula(ops.mkldnn_rnn_layer_backward)(_fused_lstm_backward_flops)


_count_fused_lstm()


def is_text_model(name: str) -> bool:
    """Whether a zoo architecture (with or without a head suffix) reads token ids rather than images."""
    return split_architecture(name)[0].startswith("text_")


def modality_problem(name: str, dataset: str, text: bool) -> str | None:
    """Why the zoo architecture `name` cannot read the data set `dataset` (text or images), or None."""
    if is_text_model(name) == text:
        return None
    if text:
        return (f"model {name!r} reads images and {dataset} is a text data set; use text models "
                f"({', '.join(TEXT_FAMILIES)}) or a text zoo ({', '.join(TEXT_ZOOS)})")
    return f"model {name!r} reads token ids and {dataset} is an image data set; use an image model or zoo"
