import pytest

from pfl import config
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
    path.write_text('dataset = "synthetic"\n[pfedlora]\nranks = 4\n')
    with pytest.raises(ConfigError,
                       match=r"recipe key 'pfedlora.ranks': unknown recipe key; did you mean pfedlora.rank"):
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
