"""Recipes: TOML files validated against one schema; `--set key=value` overrides them.

Recipe keys are a public interface: later features, users' scripts and `--set` rely on them. Every key
is declared once here (or, for a method's own settings, in that method's file as `SETTINGS`), with its
type, its allowed values and a default. Unknown keys and out-of-range values are rejected by name.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pfl.algorithms import ALGORITHMS
from pfl.algorithms.aggregation import RULES
from pfl.errors import ConfigError
from pfl.models import ZOOS, model_problem
from pfl.models.text import modality_problem
from pfl.schema import TABLE_KINDS, TEXT_DATASETS, Config, Field

__all__ = [
    "LABEL_KEYS",
    "PLACEMENT_KEYS",
    "RELOCATABLE_KEYS",
    "SCHEMA",
    "Config",
    "Field",
    "computation",
    "first_difference",
    "from_toml",
    "full_schema",
    "list_recipes",
    "load",
    "parse_override",
    "read_recipe_file",
    "resolve",
    "table_keys",
]


def _image_shape(value: list[int]) -> str | None:
    if len(value) != 3 or not 1 <= value[0] <= 4 or not 12 <= value[1] <= 256 or value[1] != value[2]:
        return f"expected [channels 1..4, size 12..256, same size], got {value!r}"
    return None


def _plain_file_name(value: str) -> str | None:
    """`name` becomes part of file names (`runs/<name>-...`, `<name>-partition.png`): one plain name only."""
    if (not value.strip() or value.startswith(".") or any(c in value for c in "/\\")
            or any(ord(c) < 32 for c in value) or len(value) > 100):
        return (f"got {value!r}: it must be a plain file name (not empty, no '/' or '\\', no leading '.', no "
                "control characters, at most 100 characters)")
    return None


DATASETS = ("cifar10", "cifar100", "fmnist", "synthetic", *TEXT_DATASETS)

# The top-level schema. Method-specific tables come from each algorithm's SETTINGS.
SCHEMA: dict[str, Field] = {
    "name": Field("str", "custom", "short name of the recipe (a plain file name: runs are named after it)",
                  check=_plain_file_name),
    "description": Field("str", "", "one line shown by `pfl recipes`"),
    "dataset": Field("str", "synthetic", "data set", choices=DATASETS),
    "data_dir": Field("str", "", "where the data set lives; empty: the data set's default place"),
    "download": Field("bool", True, "download the data set when it is missing and the internet is reachable"),
    "max_len": Field("int", 128, "text data sets: tokens per sample (longer texts are truncated, shorter ones padded "
                     "with id 0); ignored for images", low=1, high=100_000),
    "vocab_size": Field("int", 16384, "text data sets: token ids are hashed into 1..vocab_size-1 (0 is padding); "
                        "ignored for images", low=2, high=10_000_000),
    "text_bigrams": Field("bool", True, "text data sets: each word from the second on is followed by the bigram it "
                          "closes (pfl.data.text); ignored for images"),
    "partition": Field("str", "pathological", "label skew across clients",
                       choices=("pathological", "dirichlet", "iid")),
    "classes_per_client": Field("int", 2, "pathological partition: classes per client", low=1),
    "dirichlet_alpha": Field("float", 0.5, "Dirichlet partition: concentration", low=0.0, low_open=True),
    "data_fraction": Field("float", 1.0, "share of the pooled data set the clients share: a seeded subset, "
                           "stratified by class, drawn before partitioning (quick experiments); 1: all",
                           low=0.0, high=1.0, low_open=True),
    "min_client_samples": Field("int", 10, "Dirichlet partition: redraw until every client holds at least this "
                                "many samples (capped at samples / num_clients)", low=1),
    "test_fraction": Field("float", 0.2, "per-client share held out for the personalised test set",
                           low=0.0, high=0.9, low_open=True),
    "val_fraction": Field("float", 0.0, "per-client share of the training data held out for validation "
                          "(stratified, seeded, never trained on); 0: none. `pfl tune` selects on it",
                          low=0.0, high=0.5),
    "eval_test": Field("bool", True, "evaluate on the test split (pfl tune turns it off, so no tuning decision "
                       "can see test data)"),
    "num_clients": Field("int", 10, "N, number of clients", low=1, high=100_000),
    "participation": Field("float", 1.0, "C, share of clients sampled each round", low=0.0, high=1.0,
                           low_open=True),
    "rounds": Field("int", 500, "T, communication rounds", low=1),
    "local_epochs": Field("int", 1, "E, local epochs per round", low=1),
    "batch_size": Field("int", 64, "mini-batch size", low=1, high=65536),
    "lr": Field("float", 0.01, "SGD learning rate", low=0.0, low_open=True),
    "momentum": Field("float", 0.9, "SGD momentum", low=0.0, high=0.999),
    "weight_decay": Field("float", 1e-3, "SGD weight decay", low=0.0),
    "grad_clip": Field("float", 50.0, "gradient-norm clip (0 turns it off)", low=0.0),
    "model_setting": Field("str", "heterogeneous", "client k gets zoo[k mod len(zoo)] or all zoo[0]",
                           choices=("heterogeneous", "homogeneous")),
    "model_zoo": Field("list[str]", ZOOS["paper-cnn"], "architectures, in order, or a zoo's name (paper-cnn: the "
                       "paper's five CNNs; htfe8: a CNN, GoogLeNet, MobileNetV2, ResNet-18/34/50/101/152; "
                       "mixed-small: CNN-1, ResNet-18, MobileNetV3-small, ShuffleNetV2, a small ViT; a name may "
                       "carry a head deeper than one layer, e.g. resnet18+h512-256; zoos of such heads: "
                       "paper-cnn-htc4, res34-htc4, htfe8-htc4)", named=ZOOS),
    "representation_dim": Field("int", 500, "d, size of the representation shared by the zoo", low=1,
                                high=65536),
    "augment": Field("bool", False, "random crop (pad 4) and horizontal flip while training"),
    "eval_every": Field("int", 1, "evaluate every client every this many rounds (and after the last)",
                        low=1),
    "diagnostics_every": Field("int", 1, "rounds between a method's diagnostics (measured after training on each "
                               "trained client's first 256 samples); 0 = never", low=0),
    "evaluate_at": Field("str", "after_training", "what a round's evaluation tests: each client's model as it "
                         "last trained, or what it holds after receiving the next round's download, before "
                         "training (the field's benchmark library; docs/algorithms.md)",
                         choices=("after_training", "round_start")),
    "seed": Field("int", 0, "one seed for partition, sampling, init and data order", low=0),
    "method": Field("str", "pfedlora", "the federated method"),
    "target_accuracy": Field("float", 0.0, "mean accuracy at which the to-target costs (rounds, bytes, FLOPs) "
                             "are read; 0: none", low=0.0, high=1.0),
    "store": Field("str", "memory", "where client states live between rounds (the flower engine always uses "
                   "disk)", choices=("memory", "disk")),
    "engine": Field("str", "local", "what runs the rounds: in this process, or Flower (simulation with Ray, or a "
                    "deployment started by `pfl deploy`)", choices=("local", "flower")),
    "checkpoint_every": Field("int", 10, "write the complete run state every this many rounds, so that "
                              "`pfl train --resume` can continue after a crash (0: never)", low=0),
    "min_clients": Field("int", 1, "fewest usable client updates a round needs; below it the run stops", low=1),
    "aggregation": Field("str", "mean", "the server's mean: each method's own (sample- or count-weighted) mean, or "
                         "the coordinate-wise median or trimmed mean over the uploads (unweighted; per class for "
                         "class tables; docs/algorithms.md)", choices=RULES),
    "aggregation_trim": Field("float", 0.1, "aggregation = \"trimmed_mean\": the share of values dropped from each "
                              "end of every coordinate, k = floor(trim x uploads)", low=0.0, high=0.5,
                              high_open=True),
    "clip_update_norm": Field("float", 0.0, "scale every upload's update (upload minus the server's current "
                              "value) down to at most this L2 norm before aggregating; 0: off", low=0.0),
    "flower.num_supernodes": Field("int", 0, "Flower simulation: SuperNodes (node p serves the clients k with "
                                   "k mod nodes = p); 0: one per client", low=0),
    "flower.client_cpus": Field("float", 1.0, "Flower: CPU cores per client: Ray resources in a simulation, and "
                                "every ClientApp's torch threads (rounded, at least 1)", low=0.0, low_open=True),
    "flower.client_gpus": Field("float", 0.0, "Flower simulation: share of a GPU per client, e.g. 0.25 for four "
                                "clients per GPU (Ray resources)", low=0.0),
    "flower.round_timeout": Field("float", 600.0, "Flower: seconds the server waits for a round's replies; a "
                                  "client that has not answered by then is dropped from that round",
                                  low=0.0, low_open=True),
    "flower.max_upload_mb": Field("float", 1024.0, "Flower: the largest update (MB) the server decodes from one "
                                  "client; a larger one drops that client for the round", low=0.0, low_open=True,
                                  high=65536.0),
    "synthetic.num_samples": Field("int", 2000, "synthetic data: samples in all", low=10, high=10_000_000),
    "synthetic.num_classes": Field("int", 10, "synthetic data: classes", low=2, high=1000),
    "synthetic.image_shape": Field("list[int]", [1, 16, 16], "synthetic data: [channels, size, size]",
                                   check=_image_shape),
    "synthetic.noise": Field("float", 0.5, "synthetic data: noise scale relative to the class signal",
                             low=0.0),
}

# Keys a method may set differently from another in a comparison, and that `pfl tune` may search (with the
# method's own table); every other key is the protocol, the same for every run of a comparison.
HYPERPARAMETERS = ("lr", "momentum", "weight_decay", "grad_clip", "local_epochs", "batch_size")

# What a run computes versus where and how it runs. PLACEMENT_KEYS say where the data set is found, where client
# states live, what executes the rounds (a Flower run computes what a local run does) and how often it
# checkpoints: runs that differ only in them (and in LABEL_KEYS) train the same clients on the same data with
# the same draws, so `pfl compare` puts them in one table. They may still change a run's measured seconds.
PLACEMENT_KEYS = frozenset({"data_dir", "download", "store", "engine", "checkpoint_every",
                            *(key for key in SCHEMA if key.startswith("flower."))})
LABEL_KEYS = frozenset({"name", "description"})  # what a run is called and shown as
# Reusing a finished or interrupted run (pfl compare, pfl tune) is stricter: the run directory must be the one
# this command would write (its config.toml, its engine's timings), except where the same data set now lives.
RELOCATABLE_KEYS = frozenset({"data_dir"})


def computation(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a flat recipe that say what a run computes (no placement, no labels)."""
    return {k: v for k, v in flat.items() if k not in PLACEMENT_KEYS and k not in LABEL_KEYS}


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], ignore: frozenset[str] = frozenset()) -> str | None:
    """The first key (in sorted order, outside `ignore`) whose value differs between two flat recipes."""
    return next((k for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)), None)


def full_schema(methods: Mapping[str, Any] = ALGORITHMS) -> dict[str, Field]:
    """The top-level schema plus every registered method's table (`<method>.<key>`)."""
    schema = dict(SCHEMA)
    for name, algorithm in methods.items():
        for key, field in algorithm.SETTINGS.items():
            schema[f"{name}.{key}"] = field
    return schema


def table_keys(methods: Mapping[str, Any] = ALGORITHMS) -> frozenset[str]:
    """The recipe keys whose value is a whole TOML table (kind 'table[int]'), e.g. `pfedlora.ranks`."""
    return frozenset(key for key, field in full_schema(methods).items() if field.kind in TABLE_KINDS)


def _flatten(data: dict[str, Any], tables: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys, except that a table-valued key (`tables`) keeps its table as one value."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in tables:
            flat.update(_flatten(value, tables, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def list_recipes() -> dict[str, Path]:
    """Bundled recipes, by name."""
    root = resources.files("pfl.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def read_recipe_file(name_or_path: str, methods: Mapping[str, Any] = ALGORITHMS) -> tuple[dict[str, Any], str]:
    """Return the raw (flattened) recipe and where it came from: a bundled name or a TOML path. `methods`: the
    registry whose tables' table-valued keys stay whole."""
    recipes = list_recipes()
    if name_or_path in recipes:
        path = recipes[name_or_path]
    else:
        path = Path(name_or_path)
        if not (name_or_path.endswith(".toml") or path.exists()):
            raise ConfigError(
                f"--recipe: unknown recipe '{name_or_path}'; bundled recipes are "
                f"{', '.join(sorted(recipes))}, or give a path to a .toml file"
            )
        if not path.is_file():
            raise ConfigError(f"--recipe: file '{path}' does not exist or is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--recipe: '{path}' is not valid TOML: {exc}") from None
    return _flatten(data, table_keys(methods)), str(path)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as TOML (numbers, true/false, [lists], {tables}, "strings"); a bare word
    that is not TOML is taken as a string, so `--set dataset=fmnist` works without quotes."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. --set rounds=20")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"--set '{text}': the key is empty")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def resolve(raw: dict[str, Any], overrides: dict[str, Any] | None = None,
            methods: Mapping[str, Any] = ALGORITHMS) -> Config:
    """Defaults <- recipe <- overrides, each key validated against the schema and the `methods` registry's
    tables; then cross-key checks."""
    schema = full_schema(methods)
    values = {key: field.default for key, field in schema.items()}
    for source, items in (("recipe", raw), ("--set", overrides or {})):
        for key, value in items.items():
            if key not in schema:
                raise ConfigError(_unknown_key(key, schema, source))
            values[key] = schema[key].coerce(key, value)
    cfg = Config(values)
    _cross_checks(cfg, methods)
    return cfg


def _unknown_key(key: str, schema: dict[str, Field], source: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(schema), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `pfl recipes --keys` lists them all"
    return f"{source} key '{key}': unknown recipe key{hint}"


def _cross_checks(cfg: Config, methods: Mapping[str, Any]) -> None:
    if cfg.method not in methods:
        raise ConfigError(f"recipe key 'method': must be one of {', '.join(sorted(methods))}, "
                          f"got {cfg.method!r}")
    for name in cfg.model_zoo:
        problem = model_problem(name) or modality_problem(name, cfg.dataset, cfg.is_text)
        if problem:
            raise ConfigError(f"recipe key 'model_zoo': {problem}")
    if cfg.is_text and cfg.augment:
        raise ConfigError(f"recipe key 'augment': random crop and flip are image augmentations; it must be false "
                          f"for the text data set {cfg.dataset}")
    if cfg.partition == "pathological" and cfg.classes_per_client > cfg.num_classes:
        raise ConfigError(f"recipe key 'classes_per_client': must be <= the {cfg.num_classes} classes "
                          f"of {cfg.dataset}, got {cfg.classes_per_client}")
    sampled = max(1, math.floor(cfg.participation * cfg.num_clients + 0.5))
    if cfg.min_clients > sampled:
        raise ConfigError(f"recipe key 'min_clients': must be <= the {sampled} clients sampled per round "
                          f"(participation x num_clients), got {cfg.min_clients}")
    if cfg["flower.num_supernodes"] > cfg.num_clients:
        raise ConfigError(f"recipe key 'flower.num_supernodes': must be <= num_clients ({cfg.num_clients}), "
                          f"got {cfg['flower.num_supernodes']}")
    methods[cfg.method].check_config(cfg)


def load(recipe: str, overrides: list[str] | None = None, seed: int | None = None) -> tuple[Config, str]:
    """Read, override and validate a recipe; returns the config and the recipe's source."""
    raw, source = read_recipe_file(recipe)
    parsed = dict(parse_override(o) for o in overrides or [])
    if seed is not None:
        parsed["seed"] = seed
    return resolve(raw, parsed), source


def from_toml(text: str, methods: Mapping[str, Any] = ALGORITHMS) -> Config:
    """A resolved config from TOML text (what a run directory's config.toml or a Flower message holds)."""
    return resolve(_flatten(tomllib.loads(text), table_keys(methods)), methods=methods)
