from dataclasses import dataclass

import pytest

from pfl import config
from pfl.algorithms import ALGORITHMS
from pfl.algorithms.base import Algorithm, Settings, setting
from pfl.errors import ConfigError


def test_bundled_recipes_all_validate():
    names = set(config.list_recipes())
    assert {"cifar10", "cifar100", "fmnist", "smoke"} <= names
    for name in names:
        cfg, _ = config.load(name)
        assert cfg.name == name


def test_paper_protocol_recipes():
    c10, _ = config.load("cifar10")
    c100, _ = config.load("cifar100")
    assert (c10.num_clients, c10.participation, c10.classes_per_client, c10.rounds) == (10, 1.0, 2, 500)
    assert c100.classes_per_client == 10 and c10.augment and c10.model_setting == "heterogeneous"
    cfg, _ = config.load("cifar10", ["num_clients=50", "participation=0.2"])
    assert (cfg.num_clients, cfg.participation) == (50, 0.2)


@pytest.mark.parametrize("override, fragment", [
    ("rounds=0", "'rounds': must be an integer >= 1"),
    ("participation=0", "'participation'"),
    ("participation=1.5", "'participation'"),
    ("lr=-1", "'lr'"),
    ("partition=random", "'partition': must be one of pathological, dirichlet, iid"),
    ("num_clients=2.5", "'num_clients'"),
    ("pfedlora.mu=0", "'pfedlora.mu'"),
    ("pfedlora.inference_adapter=mine", "'pfedlora.inference_adapter'"),
    ("pfedlora.rank=0", "'pfedlora.rank'"),
    ("roundz=3", "'roundz': unknown recipe key; did you mean rounds"),
    ("method=fedsomething", "'method': must be one of"),
    ("model_zoo=['cnn9']", "'model_zoo': unknown model 'cnn9'"),
    ("classes_per_client=11", "'classes_per_client'"),
    ("download=maybe", "'download': must be true or false"),
    ("norounds", "expected key=value"),
])
def test_bad_values_are_rejected_by_name(override, fragment):
    with pytest.raises(ConfigError) as err:
        config.load("fmnist", [override])
    assert fragment in str(err.value)


def test_set_values_are_read_as_toml_and_bare_words_as_strings():
    assert config.parse_override("lr=0.05") == ("lr", 0.05)
    assert config.parse_override("model_zoo=['cnn1', 'cnn5']") == ("model_zoo", ["cnn1", "cnn5"])
    assert config.parse_override("dataset=fmnist") == ("dataset", "fmnist")
    assert config.parse_override("augment=true") == ("augment", True)


def test_unknown_key_in_a_recipe_file_is_rejected(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('dataset = "synthetic"\n[pfedlora]\nrnak = 4\n')
    with pytest.raises(ConfigError,
                       match=r"recipe key 'pfedlora.rnak': unknown recipe key; did you mean pfedlora.rank"):
        config.load(str(path))


def test_resolved_config_round_trips_through_toml(tmp_path):
    import tomli_w
    cfg, _ = config.load("fmnist", ["pfedlora.rank=4"])
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(cfg.as_nested()))
    again, _ = config.load(str(path))
    assert again.as_flat() == cfg.as_flat()


def test_placement_and_label_keys_are_recipe_keys_and_leave_the_computation():
    """The one vocabulary of what a run computes (pfl compare, parallel, tune read it): a misspelt key there
    would silently make a protocol key free."""
    assert (config.PLACEMENT_KEYS | config.LABEL_KEYS).issubset(config.SCHEMA)
    assert config.RELOCATABLE_KEYS <= config.PLACEMENT_KEYS
    flat = config.resolve({}).as_flat()
    kept = config.computation(flat)
    assert "dataset" in kept and "lr" in kept and not set(kept) & (config.PLACEMENT_KEYS | config.LABEL_KEYS)
    assert config.first_difference(flat, {**flat, "store": "disk", "lr": 0.5}) == "lr"
    assert config.first_difference(flat, {**flat, "data_dir": "/x"}, ignore=config.RELOCATABLE_KEYS) is None


# ------------------------------------------------------------ table keys (a TOML table of names to integers)

def _even_names(table: dict) -> str | None:
    odd = [name for name in table if len(name) % 2]
    return f"names must have an even length, got {', '.join(odd)}" if odd else None


@dataclass(frozen=True)
class _ToySettings(Settings):
    rank: int = setting(2, "a plain key beside the tables", low=1)
    sizes: dict[str, int] = setting({}, "a size per name", low=1, high=64, check=_even_names)
    widths: dict[str, int] = setting({"aa": 3}, "a table whose default is not empty", low=0)


class _Toy(Algorithm):
    """A method that is only ever in these tests' registry (`methods=`), never registered."""

    name = "toy"
    Settings = _ToySettings
    SETTINGS = _ToySettings.schema()


TOY = {**ALGORITHMS, "toy": _Toy}


def _toy_recipe(tmp_path, text: str) -> dict:
    path = tmp_path / "r.toml"
    path.write_text('dataset = "synthetic"\n' + text)
    return config.read_recipe_file(str(path), methods=TOY)[0]


@pytest.mark.parametrize("text", [
    "[toy]\nrank = 3\nsizes = { bb = 4, cccc = 8 }\n",
    "[toy]\nrank = 3\n[toy.sizes]\nbb = 4\ncccc = 8\n",
    "[toy]\nrank = 3\nsizes.bb = 4\nsizes.cccc = 8\n",
])
def test_a_table_key_is_one_value_in_every_toml_spelling(tmp_path, text):
    raw = _toy_recipe(tmp_path, text)
    assert raw["toy.sizes"] == {"bb": 4, "cccc": 8} and raw["toy.rank"] == 3
    cfg = config.resolve(raw, methods=TOY)
    assert cfg["toy.sizes"] == {"bb": 4, "cccc": 8} and type(cfg["toy.sizes"]) is dict
    assert list(cfg["toy.sizes"]) == ["bb", "cccc"]  # in the given order
    assert cfg.table("toy") == {"rank": 3, "sizes": {"bb": 4, "cccc": 8}, "widths": {"aa": 3}}


def test_a_table_key_defaults_to_its_table_and_is_set_with_set():
    fields = config.full_schema(TOY)
    assert fields["toy.sizes"].kind == "table[int]" and fields["toy.sizes"].default == {}
    assert repr(fields["toy.sizes"].default) == "{}"  # what `pfl recipes --keys` shows
    assert fields["toy.sizes"].describe() == "a table of names to integers >= 1 and <= 64"
    assert {"toy.sizes", "toy.widths"} <= config.table_keys(TOY) and "toy.rank" not in config.table_keys(TOY)
    assert "toy.sizes" not in config.table_keys()  # only in the registry given
    cfg = config.resolve({}, methods=TOY)
    assert cfg["toy.sizes"] == {} and cfg["toy.widths"] == {"aa": 3}
    key, value = config.parse_override("toy.sizes={bb=2, dddd=4}")
    assert (key, value) == ("toy.sizes", {"bb": 2, "dddd": 4})
    assert config.resolve({}, {key: value}, methods=TOY)["toy.sizes"] == {"bb": 2, "dddd": 4}
    assert config.resolve({}, {"toy.widths": {}}, methods=TOY)["toy.widths"] == {}


def test_a_table_key_round_trips_through_config_toml(tmp_path):
    import tomli_w
    for sizes, widths in (({"bb": 4, "cccc": 8}, {}), ({}, {"aa": 3, "bb": 0})):
        cfg = config.resolve({"toy.sizes": sizes, "toy.widths": widths}, methods=TOY)
        text = tomli_w.dumps(cfg.as_nested())  # what a run directory's config.toml holds
        again = config.from_toml(text, methods=TOY)
        assert again.as_flat() == cfg.as_flat() and again["toy.widths"] == widths
        path = tmp_path / "c.toml"
        path.write_text(text)
        assert config.resolve(config.read_recipe_file(str(path), methods=TOY)[0], methods=TOY).as_flat() \
            == cfg.as_flat()


@pytest.mark.parametrize("value, fragment", [
    (3, "must be a table of names to integers >= 1 and <= 64, got 3"),
    ("bb", "got 'bb'"),
    ([1, 2], "got [1, 2]"),
    ({"bb": 0}, "got bb = 0"),
    ({"bb": 65}, "got bb = 65"),
    ({"bb": 2.5}, "got bb = 2.5"),
    ({"bb": True}, "got bb = True"),
    ({"bb": "4"}, "got bb = '4'"),
    ({"bb": [4]}, "got bb = [4]"),
    ({"bb": {"c": 1}}, "got bb = {'c': 1}"),
    ({1: 4}, "got the name 1"),
    ({"bb": 4, "ccc": 2}, "names must have an even length, got ccc"),  # the check sees the names
])
def test_bad_tables_are_rejected_by_name_in_one_line(value, fragment):
    with pytest.raises(ConfigError) as err:
        config.resolve({}, {"toy.sizes": value}, methods=TOY)
    message = str(err.value)
    assert message.startswith("recipe key 'toy.sizes': must be a table of names to integers >= 1 and <= 64, ")
    assert fragment in message and "\n" not in message


def test_bad_tables_in_a_recipe_file_and_with_set_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe key 'toy.sizes': .*got bb = 0"):
        config.resolve(_toy_recipe(tmp_path, "[toy.sizes]\nbb = 0\n"), methods=TOY)
    with pytest.raises(ConfigError, match=r"recipe key 'toy.sizes': .*got 4"):
        config.resolve(_toy_recipe(tmp_path, "[toy]\nsizes = 4\n"), methods=TOY)
    with pytest.raises(ConfigError, match=r"--set key 'toy.sizes.bb': unknown recipe key; did you mean toy.sizes"):
        config.resolve({}, dict([config.parse_override("toy.sizes.bb=4")]), methods=TOY)
    assert config.resolve({}, {"toy.sizes": {"bb": 2.0}}, methods=TOY)["toy.sizes"] == {"bb": 2}  # as for an int


def test_a_table_setting_is_read_only_and_the_settings_stay_hashable():
    import copy
    import pickle

    cfg = config.resolve({}, {"toy.sizes": {"bb": 4}}, methods=TOY)
    s = _ToySettings.from_config(cfg, "toy")
    assert s.sizes == {"bb": 4} and isinstance(s.sizes, dict) and s.widths == {"aa": 3}
    with pytest.raises(TypeError, match="read-only"):
        s.sizes["bb"] = 5
    with pytest.raises(TypeError, match="read-only"):
        s.sizes.update(cc=1)
    assert cfg["toy.sizes"] == {"bb": 4}
    assert hash(s) == hash(_ToySettings(rank=2, sizes={"bb": 4}, widths={"aa": 3}))
    assert s == _ToySettings(sizes={"bb": 4}) and s != _ToySettings()
    assert pickle.loads(pickle.dumps(s)) == s and copy.deepcopy(s) == s
    assert type(pickle.loads(pickle.dumps(s)).sizes) is type(s.sizes)
    assert _ToySettings().sizes == {} and hash(_ToySettings()) == hash(_ToySettings())


def test_a_setting_of_an_unsupported_type_is_refused():
    @dataclass(frozen=True)
    class Odd(Settings):
        weights: dict[str, float] = setting({}, "not a kind")

    with pytest.raises(TypeError, match=r"Odd.weights: a setting is one of .*dict\[str, int\], got dict\[str, float\]"):
        Odd.schema()


def test_a_table_key_cannot_be_tuned(monkeypatch):
    from pfl import tune

    monkeypatch.setitem(ALGORITHMS, "toy", _Toy)
    assert "toy.sizes" not in tune.tunable_keys("toy") and "toy.rank" in tune.tunable_keys("toy")
    with pytest.raises(ConfigError, match=r"--space 'toy.sizes=1:4': 'toy.sizes' is a table of names to integers "
                                          r">= 1 and <= 64, which pfl tune cannot search; set it with --set"):
        tune.parse_dimension("toy.sizes=1:4", "toy", {})


def test_trackers_log_a_table_as_one_hyperparameter():
    from pfl.trackers import _param

    assert _param({"cnn1": 2, "cnn5": 8}) == "{cnn1 = 2, cnn5 = 8}" and _param({}) == "{}"
    assert _param(["cnn1", "cnn5"]) == "cnn1, cnn5" and _param(0.5) == 0.5
