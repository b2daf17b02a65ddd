from pathlib import Path

import pytest

from dtl.cli import build_parser
from dtl.config import Config, config_from_args, field_docs
from dtl.errors import UserError


def parse(*flags: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *flags]))


def test_defaults_follow_the_reference_recipe():
    cfg = Config()
    assert (cfg.model, cfg.mode, cfg.weights, cfg.epochs, cfg.batch_size) == ("vgg16", "transfer", "imagenet", 3, 32)
    assert (cfg.lr, cfg.momentum, cfg.image_size) == (1e-3, 0.9, 224)
    assert Config(mode="scratch").weights == "none"


def test_every_field_is_documented():
    import dataclasses

    docs = field_docs()
    assert {f.name for f in dataclasses.fields(Config)} <= set(docs)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("momentum", 1.5),
                                         ("image_size", 0), ("label_smoothing", 1.0), ("train_subset", 0)])
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        Config(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_transfer_with_random_backbone_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        Config(mode="transfer", weights="none")


def test_cache_features_needs_no_augment():
    with pytest.raises(ValueError, match="augment"):
        Config(cache_features=True)
    assert Config(cache_features=True, augment=False).cache_features


def test_toml_then_flags_win(tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "resnet18"\nepochs = 7\nbatch-size = 8\n')
    cfg = parse("--config", str(toml), "--epochs", "2")
    assert (cfg.model, cfg.epochs, cfg.batch_size) == ("resnet18", 2, 8)


def test_bad_toml_key_and_bad_flag_value(tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text("epoks = 3\n")
    with pytest.raises(UserError, match="epoks"):
        parse("--config", str(toml))
    with pytest.raises(UserError, match="epochs"):
        parse("--epochs", "-3")
    with pytest.raises(SystemExit) as exit_info:
        parse("--mode", "transfr")
    assert exit_info.value.code == 2


def test_debug_means_small_single_process_run():
    cfg = parse("--debug", "--epochs", "5")
    assert (cfg.epochs, cfg.num_workers, cfg.train_subset, cfg.eval_subset) == (1, 0, 256, 256)
