"""The real Hydra config: composition, overrides, and clear refusals of typos and bad values."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import ROOT, run_train
from seg.config import ConfigError, register_configs, validate

register_configs()


def compose_train(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose(config_name="train", overrides=list(overrides))


def test_defaults_are_the_paper_protocol():
    cfg = compose_train()
    assert cfg.norm.name == "bn" and cfg.data.name == "phantom" and cfg.data.task == "rv"
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.lr) == ("sgd", 0.9, cfg.lr)
    assert (cfg.trainer.epochs, list(cfg.schedule.milestones), cfg.schedule.gamma) == (2, [1], 0.2)
    assert (cfg.model.base_channels, cfg.model.depth, cfg.data.image_size) == (16, 4, 256)
    assert cfg.loss == "ce"
    validate(cfg)


def test_top_level_lr_and_norm_groups():
    cfg = compose_train("norm=iln", "lr=0.5")
    assert cfg.optim.lr == 0.5 and cfg.norm.name == "iln" and cfg.norm.groups == 16
    assert compose_train("norm=gn", "norm.groups=8").norm.groups == 8
    assert compose_train("data=acdc", "data.root=/x").data.root == "/x"


def test_smoke_experiment_shrinks_everything():
    cfg = compose_train("experiment=smoke")
    assert (cfg.data.image_size, cfg.model.depth, cfg.trainer.epochs) == (64, 2, 1)
    assert cfg.data.max_patients <= 5 and cfg.trainer.batch_size <= 2
    validate(cfg)


def test_typo_in_a_key_is_refused_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train("trainer.epoch=3")
    assert "trainer.epoch" in str(info.value) + str(info.value.__cause__)


def test_wrong_type_is_refused_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_train("lr=fast")
    assert "lr" in str(info.value) + str(info.value.__cause__)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_train("trainer.batch_size=2.5")


def test_bad_choices_and_norm_options_are_refused():
    with pytest.raises(ConfigError, match="data.task='la' is not valid; choose one of: rv, lv, myo, multi"):
        validate(compose_train("data.task=la"))
    with pytest.raises(ConfigError, match="norm option 'groups' of 'gn' must be an integer"):
        validate(compose_train("norm=gn", "norm.groups=abc"))
    with pytest.raises(ConfigError, match="image_size=100 must be a multiple of"):
        validate(compose_train("data.image_size=100"))
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_train("norm=gn", "norm.grups=8")


def test_unknown_norm_on_the_command_line_lists_the_valid_names():
    result = run_train("norm=batchnorm", check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "norm/batchnorm" in message and "Available options" in message and "iln" in message


def test_typo_on_the_command_line_fails_before_training():
    result = run_train("trainer.epohcs=1", check=False)
    assert result.returncode != 0 and "trainer.epohcs" in result.stderr
    assert "Device:" not in result.stdout


def test_norm_options_that_do_not_fit_the_network_are_a_clear_error(acdc_root, tmp_path):
    result = run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "norm=gn", "norm.groups=12",
                       f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "16 channels cannot be split into 12 groups" in result.stderr
