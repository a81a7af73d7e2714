"""The real Hydra config: composition, overrides, and clear refusals of typos and bad values."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import compose_train, run_train
from seg.training.checks import ConfigError, validate
from seg.config.launch import register_configs

register_configs()


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


@pytest.mark.slow
def test_unknown_norm_on_the_command_line_lists_the_valid_names():
    result = run_train("norm=batchnorm", check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "norm/batchnorm" in message and "Available options" in message and "iln" in message


@pytest.mark.slow
def test_typo_on_the_command_line_fails_before_training():
    result = run_train("trainer.epohcs=1", check=False)
    assert result.returncode != 0 and "trainer.epohcs" in result.stderr
    assert "Device:" not in result.stdout


@pytest.mark.slow
def test_norm_options_that_do_not_fit_the_network_are_a_clear_error(acdc_root, tmp_path):
    result = run_train("experiment=smoke", "data=acdc", f"data.root={acdc_root}", "norm=gn", "norm.groups=12",
                       f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "16 channels cannot be split into 12 groups" in result.stderr


# ---------------------------------------------------------------------------- ranges, one learning rate, schedules


@pytest.mark.parametrize("overrides,message", [
    ("lr=nan", "lr=nan is not a finite number"),
    ("lr=inf", "lr=inf is not a finite number"),
    ("lr=-1", "lr=-1.0 is out of range: it must be in (0, inf)"),
    ("lr=0", "lr=0.0 is out of range"),
    ("optim.lr=0.3", "optim.lr=0.3 differs from lr=0.1: the learning rate is set by the top-level key, e.g. lr=0.3"),
    ("optim.momentum=-1", "optim.momentum=-1.0 is out of range: it must be in [0, 1)"),
    ("optim.momentum=1", "optim.momentum=1.0 is out of range"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 is out of range: it must be in [0, inf)"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan is not a finite number"),
    ("optim.grad_clip=0", "optim.grad_clip=0.0 is out of range"),
    ("optim.name=adam optim.nesterov=true", "optim.nesterov=true is an option of optim.name=sgd, not adam"),
    ("optim.momentum=0 optim.nesterov=true", "optim.nesterov=true needs optim.momentum > 0"),
    ("seed=4294967296", "seed=4294967296 is out of range: it must be in [0, 2**32-1]"),
    ("seed=-1", "seed=-1 is out of range"),
    ("trainer.num_panel_images=0", "trainer.num_panel_images=0 is out of range: it must be in [1, inf)"),
    ("trainer.checkpoint_every_n_steps=-1", "trainer.checkpoint_every_n_steps=-1 is out of range"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0 is out of range"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is out of range"),
    ("model.in_channels=0", "model.in_channels=0 is out of range"),
    ("model.aux_weight=-1", "model.aux_weight=-1.0 is out of range"),
    ("model.bias_init=nan", "model.bias_init=nan is not a finite number"),
    ("trainer.device=cuda:x", "trainer.device='cuda:x' is not valid"),
    ("schedule.name=cosine", "schedule.name='cosine' is not valid; choose one of: step, constant, poly"),
    ("schedule.name=constant", "schedule 'constant' does not read schedule.gamma (it takes no options)"),
    ("schedule=poly +schedule.gamma=0.5", "schedule 'poly' does not read schedule.gamma (its options are: power)"),
    ("schedule.milestones=[0]", "schedule.milestones must be a list of epoch numbers >= 1"),
    ("schedule.milestones=abc", "schedule.milestones must be a list of epoch numbers >= 1"),
    ("schedule.gamma=-1", "schedule.gamma must be a finite number > 0"),
    ("schedule=poly schedule.power=0", "schedule.power must be a finite number > 0"),
    ("schedule=poly ~schedule.power", "schedule 'poly' needs schedule.power"),
])
def test_values_out_of_range_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_train(*overrides.split()))
    assert message in str(info.value)


def test_the_valid_schedules_are_the_table_of_schedules():
    from seg.training.schedules import SCHEDULES

    assert set(SCHEDULES) >= {"step", "constant", "poly"}
    for name in SCHEDULES:  # every schedule of the table has its config file, which passes its own checks
        cfg = compose_train(f"schedule={name}")
        assert cfg.schedule.name == name
        validate(cfg)
    assert compose_train("schedule=poly").schedule.power == 0.9  # nnU-Net's


def test_the_valid_optimizers_and_losses_are_their_tables(monkeypatch):
    """optim.name and loss choose from seg/training/optimizers.py's and seg/training/losses.py's tables: every name of a table
    is valid (each optimizer with its configs/optim/ file), a name outside is refused naming the key, and a
    new entry is a valid choice without any other edit."""
    from seg.training import losses, optimizers

    for name in optimizers.OPTIMIZERS:
        cfg = compose_train(f"optim={name}")
        assert cfg.optim.name == name and cfg.optim.lr == cfg.lr
        validate(cfg)
    for name in losses.LOSSES:
        validate(compose_train(f"loss={name}"))
    with pytest.raises(ConfigError, match="optim.name='rmsprop' is not valid; choose one of: sgd, adam"):
        validate(compose_train("optim.name=rmsprop"))
    with pytest.raises(ConfigError, match="loss='focal' is not valid; choose one of: ce, dice_ce"):
        validate(compose_train("loss=focal"))
    monkeypatch.setitem(losses.LOSSES, "focal", losses.cross_entropy)
    monkeypatch.setitem(optimizers.OPTIMIZERS, "rmsprop", optimizers.sgd)
    validate(compose_train("loss=focal", "optim.name=rmsprop"))


# ---------------------------------------------------------------------------- what defines a run


def test_one_list_of_the_keys_that_do_not_define_a_run():
    """Hydra's sweep folder names, the summary and the checkpoint's resume check all use seg/config/identity.py."""
    import copy

    from omegaconf import OmegaConf

    from seg.config import identity
    from seg.study import runs as summary
    from seg.runtime.checkpoint import CheckpointError, check_compatible

    hydra_cfg = compose_train(hydra=True)
    assert list(hydra_cfg.hydra.job.config.override_dirname.exclude_keys) == list(identity.NOT_IDENTITY)
    assert summary.defines_run is identity.defines_run

    config = OmegaConf.to_container(compose_train(), resolve=True)
    flat = identity.flatten(config)
    groups = {"experiment", "hparams_search"}  # config groups: no key of their own
    assert all(key in flat or key in groups for key in identity.NOT_IDENTITY), set(identity.NOT_IDENTITY) - set(flat)

    changed = copy.deepcopy(config)
    for key in identity.NOT_IDENTITY:  # every listed key may change on resume ...
        if key in flat:
            node = changed
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = "changed"
    check_compatible(config, changed, "last.pt")
    for key in sorted(flat):  # ... and no other
        if identity.defines_run(key):
            other = identity.flatten(copy.deepcopy(config))
            assert other[key] != "changed"
            node = copy.deepcopy(config)
            target = node
            *parents, last = key.split(".")
            for part in parents:
                target = target[part]
            target[last] = "changed"
            with pytest.raises(CheckpointError, match=f"{key}: checkpoint"):
                check_compatible(config, node, "last.pt")
