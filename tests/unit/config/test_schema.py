"""`dtl.config.schema` (the sections: each field's default, documentation and rule) and how `dtl.config.loading`
fills them from flags and TOML."""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dtl.cli import build_parser
from dtl.config import SECTIONS, Config
from dtl.config.loading import add_config_arguments, config_from_args
from dtl.config.rules import doc, field_doc
from dtl.errors import UserError


def parse(*flags: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *flags]))


def test_defaults_follow_the_reference_recipe():
    cfg = Config()
    assert (cfg.backbone.model, cfg.backbone.mode, cfg.backbone.weights) == ("vgg16", "transfer", "imagenet")
    assert (cfg.optim.epochs, cfg.optim.batch_size) == (3, 32)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.data.image_size) == (1e-3, 0.9, 224)


def test_every_field_is_documented_and_its_doc_is_the_flags_help(monkeypatch):
    fields = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(fields) == len(Config.field_names())
    assert [f.name for f in fields if not field_doc(f).strip()] == []
    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag: each doc appears whole
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    help_text = parser.format_help()
    assert [f.name for f in fields if f"{field_doc(f)} (default: {f.default})" not in help_text] == []


def test_a_doc_is_one_line_of_text_and_a_field_without_one_is_named():
    assert doc("""two lines,
        indented""") == {"doc": "two lines, indented"}

    @dataclass
    class Section:
        documented: int = field(default=1, metadata=doc("Has a doc."))
        bare: int = 2

    documented, bare = dataclasses.fields(Section)
    assert field_doc(documented) == "Has a doc."
    with pytest.raises(KeyError, match="'bare' has no doc"):
        field_doc(bare)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("momentum", 1.5),
                                         ("image_size", 0), ("label_smoothing", 1.0), ("train_subset", 0)])
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        Config(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_toml_then_flags_win(tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "resnet18"\nepochs = 7\nbatch-size = 8\n')
    cfg = parse("--config", str(toml), "--epochs", "2")
    assert (cfg.backbone.model, cfg.optim.epochs, cfg.optim.batch_size) == ("resnet18", 2, 8)


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


def test_augmentation_settings_flags_toml_and_config_json(tmp_path: Path):
    """--crop-scale takes two numbers (a tuple field); TOML arrays and config.json lists come back as the tuple."""
    cfg = parse("--crop", "pad", "--crop-scale", "0.08", "1", "--auto-augment", "randaugment", "--ra-magnitude",
                "14", "--random-erasing", "0.25", "--random-erasing-value", "random", "--padding-mode", "reflect")
    d = cfg.data
    assert (d.crop, d.crop_scale, d.auto_augment, d.ra_magnitude) == ("pad", (0.08, 1.0), "randaugment", 14)
    assert (d.random_erasing, d.random_erasing_value, d.padding_mode) == (0.25, "random", "reflect")
    assert Config().data.crop_scale == (0.5, 1.0) and Config().data.auto_augment == "none"  # the defaults
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.data.crop_scale == (0.08, 1.0)
    toml = tmp_path / "run.toml"
    toml.write_text("[data]\ncrop_scale = [0.2, 0.9]\nauto-augment = \"ta_wide\"\n")
    assert parse("--config", str(toml)).data.crop_scale == (0.2, 0.9)
    with pytest.raises(SystemExit):
        parse("--crop-scale", "0.5")  # one number: argparse's usage error


@pytest.mark.parametrize("field,value", [("crop_scale", (0.6, 0.5)), ("crop_scale", (0.0, 1.0)),
                                         ("crop_scale", (0.1, 0.5, 1.0)), ("ra_magnitude", 31),
                                         ("augmix_severity", 0), ("random_erasing", 1.5), ("crop_padding", -1),
                                         ("auto_augment", "trivial")])
def test_invalid_augmentation_values(field, value):
    with pytest.raises(ValueError) as err:
        Config(**{field: value})
    assert field in str(err.value)


def test_powersgd_needs_two_plain_steps():
    with pytest.raises(ValueError, match="powersgd_start_iter must be >= 2"):
        Config(powersgd_start_iter=1)
