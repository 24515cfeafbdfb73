"""Training options of issue 18: --input_perturbation, --timestep_bias_*, --tracker_project_name, --optimizer.
Each: its flag and one-line refusals, the resume check, the model card's row, and its math against the reference
(diffusers' PyTorch scripts' formulas, optax's optimizers). The input perturbation's one-step parity with the PyTorch
script is in test_step_vs_torch.py."""
import pytest

from t2i_flax import cli, model_card
from t2i_flax.config import RunConfig
from t2i_flax.errors import FlagError

BASE = {"pretrained_model_name_or_path": "m", "dataset_name": "d"}


def config_of(**flags):
    return RunConfig.from_flags({**BASE, **flags})


def card_of(config):
    """The model card's settings of `config` (the plan's numbers do not matter here)."""
    class Plan:
        max_train_steps, global_batch_size, learning_rate = 10, 8, 1e-4

    class Trained:
        def card_settings(self):
            return {}

    return model_card.settings_table(config, Plan(), Trained())


def assert_checked_on_resume(changed: RunConfig, flags: list[str]):
    """Each flag differs from a default run's checkpoint (one line names it); a checkpoint written before the flags
    existed reads as their defaults."""
    base = config_of()
    differences = changed.resume_differences(base.to_dict())
    for flag in flags:
        assert any(d.startswith(flag + ":") for d in differences), (flag, differences)
    assert changed.resume_differences(changed.to_dict()) == []
    old = base.to_dict()
    for flag in flags:
        for group in old.values():
            group.pop(flag[2:], None)
    assert base.resume_differences(old) == []


# ---- --input_perturbation -------------------------------------------------------------------------------------


def test_input_perturbation_flag_resume_check_and_card():
    args = cli.build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert args.input_perturbation == 0.0
    config = config_of(input_perturbation=0.1)
    assert config.train.input_perturbation == 0.1
    assert_checked_on_resume(config, ["--input_perturbation"])
    assert card_of(config)["input perturbation"] == 0.1
    assert "input perturbation" not in card_of(config_of())
    with pytest.raises(FlagError, match="--input_perturbation must be >= 0"):
        config_of(input_perturbation=-0.1)
