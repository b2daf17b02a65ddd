"""`dtl.config.resolve`: a Config is its sections put together -- the recipe beneath what is given, --debug, the
defaults that depend on other settings, the checks that span sections (`fsdp_conflict` among them) -- and read
back flat (config.json) as the same Config."""

import json
import re

import pytest

from dtl.config import RECIPES, Config, fsdp_conflict, recipe_line
from dtl.config.loading import config_from_flags
from dtl.errors import UserError


def parse(*flags: str) -> Config:
    return config_from_flags(list(flags))


def test_transfer_with_random_backbone_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        Config(mode="transfer", weights="none")


def test_frozen_bn_stats_need_loaded_statistics():
    with pytest.raises(ValueError, match="freeze_bn_stats=True.*weights='none'"):
        Config(mode="scratch", freeze_bn_stats=True)
    assert Config(mode="finetune", freeze_bn_stats=True).backbone.freeze_bn_stats
    # default: on for lp-ft only, resolved into the saved config
    modes = ("transfer", "finetune", "lp-ft")
    assert [Config(mode=m).backbone.freeze_bn_stats for m in modes] == [False, False, True]
    assert not Config(mode="lp-ft", freeze_bn_stats=False).backbone.freeze_bn_stats


def test_cache_features_needs_no_augment():
    with pytest.raises(ValueError, match="augment"):
        Config(cache_features=True)
    assert Config(cache_features=True, augment=False).data.cache_features


def test_debug_means_small_single_process_run():
    cfg = parse("--debug", "--epochs", "5")
    assert (cfg.optim.epochs, cfg.data.num_workers, cfg.data.train_subset, cfg.data.eval_subset) == (1, 0, 256, 256)


def test_sections_flat_flags_and_sectioned_toml(tmp_path):
    """Settings live in sections; flags and TOML keys stay flat, a TOML file may also use section tables, and
    the saved form (config.json, checkpoints) is flat."""
    cfg = Config(lr=0.5, mode="scratch", data={"image_size": 32})
    assert (cfg.optim.lr, cfg.backbone.mode, cfg.data.image_size) == (0.5, "scratch", 32)
    assert Config.from_dict(cfg.to_dict()) == cfg and "lr" in cfg.to_dict()
    assert cfg.replace(epochs=7).optim.epochs == 7 and cfg.optim.epochs == 3
    toml = tmp_path / "run.toml"
    toml.write_text('[optim]\nlr = 0.25\nbatch-size = 8\n[backbone]\nmode = "finetune"\n')
    cfg = parse("--config", str(toml), "--batch-size", "16")
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.backbone.mode) == (0.25, 16, "finetune")
    with pytest.raises(ValueError, match="keep_last must be > 0, got 0"):
        Config(checkpoint={"keep_last": 0})
    with pytest.raises(UserError, match="unknown config key"):
        Config.from_dict({"lrr": 1})


def test_recipe_strong_sets_its_settings_and_explicit_ones_win(tmp_path):
    strong = parse("--recipe", "strong")
    assert (strong.optim.optimizer, strong.optim.lr) == ("adamw", 1e-3)
    # measured not to help few-label fine-tuning on both real tasks of RESULTS.md: not part of the recipe
    assert (strong.optim.weight_decay, strong.optim.lr_schedule, strong.optim.warmup_epochs,
            strong.optim.label_smoothing, strong.optim.layer_decay, strong.optim.head_lr_mult,
            strong.optim.clip_grad_norm, strong.optim.ema_decay) == (0.0, "constant", 0.0, 0.0, 1.0, 1.0, None, 0.0)
    assert parse("--recipe", "strong", "--lr", "0.01", "--weight-decay", "0.05").optim.lr == 0.01
    toml = tmp_path / "r.toml"
    toml.write_text('recipe = "strong"\n[optim]\nlayer-decay = 0.9\n')
    assert parse("--config", str(toml)).optim.layer_decay == 0.9
    assert parse().to_dict() == parse("--recipe", "plain").to_dict()  # plain sets nothing


def test_the_log_says_what_the_recipe_set_and_what_was_given_over_it(tmp_path):
    """One line: the recipe's settings in force, then the ones given explicitly (flags, TOML) that won."""
    assert recipe_line(parse("--recipe", "strong", "--lr", "0.01", "--weight-decay", "0.05", "--epochs", "5")) == (
        "recipe strong: optimizer=adamw; overridden by you: lr=0.01 (recipe: 0.001)")
    assert recipe_line(parse("--recipe", "strong")) == (
        "recipe strong: optimizer=adamw lr=0.001; overridden by you: nothing")
    toml = tmp_path / "r.toml"
    toml.write_text('recipe = "strong"\n[optim]\noptimizer = "sgd"\n')
    assert recipe_line(parse("--config", str(toml))).endswith("overridden by you: optimizer=sgd (recipe: adamw)")
    # config.json read back (every value explicit) says the same; plain sets nothing, so says nothing
    cfg = parse("--recipe", "strong", "--lr", "0.01")
    assert recipe_line(Config.from_dict(json.loads(json.dumps(cfg.to_dict())))) == recipe_line(cfg)
    assert recipe_line(parse()) is None and RECIPES["plain"] == {}


def test_augmentation_options_need_augment_on():
    with pytest.raises(ValueError, match="no-augment"):
        Config(augment=False, auto_augment="ta_wide")
    with pytest.raises(ValueError, match="no-augment"):
        Config(augment=False, random_erasing=0.1)


@pytest.mark.parametrize("flags, named", [
    ({"grad_compress": "powersgd"}, "grad_compress='powersgd' with strategy='fsdp'"),
    ({"compile": True}, "compile=True with strategy='fsdp'"),
    ({"mode": "transfer", "augment": False, "cache_features": True}, "cache_features=True with strategy='fsdp'"),
    ({"precision": "fp16"}, "precision='fp16' with strategy='fsdp'"),
    ({"mode": "lp-ft"}, "mode='lp-ft' with strategy='fsdp'"),
])
def test_fsdp_refuses_what_it_cannot_run_naming_the_combination(flags, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Config(strategy="fsdp", **flags)
    Config(strategy="ddp", **flags)  # fine under DDP


def test_fsdp_conflict_is_asked_again_of_a_config_built_without_strategy_fsdp():
    """strategy auto may turn into fsdp under `accelerate launch` after the config is built: the training build
    asks fsdp_conflict of the resolved config then."""
    assert fsdp_conflict(Config(strategy="auto", precision="fp16")) == (
        "precision='fp16' with strategy='fsdp': the fp16 GradScaler is not wired to sharded gradients; "
        "use --precision bf16 (or fp32), or --strategy ddp")
    assert fsdp_conflict(Config(strategy="auto")) is None


def test_the_defaults_that_depend_on_other_settings_are_resolved_into_the_saved_config():
    assert (Config(mode="scratch").backbone.weights, Config().backbone.weights) == ("none", "imagenet")
    assert (Config(dataset="folder").data.subset_order, Config().data.subset_order) == ("stratified", "first")
    assert Config(subset_order="random", dataset="folder").data.subset_order == "random"
    saved = Config(mode="scratch", dataset="folder").to_dict()
    assert (saved["weights"], saved["subset_order"], saved["freeze_bn_stats"]) == ("none", "stratified", False)
