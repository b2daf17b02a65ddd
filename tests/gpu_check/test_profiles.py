"""`tests.gpu_check.profiles`: which models each step needs, and the speed goals."""

from __future__ import annotations

from tests.gpu_check.profiles import CACHED_GOAL_IMG_S, CPU_SMOKE, GPU, SPEED_GOALS, speed_goals_missed
from tests.gpu_check.steps import STEPS


def test_the_inputs_step_makes_weights_for_the_steps_that_run():
    everything = [name for name, _, _ in STEPS]
    assert GPU.models(everything) == ["resnet18", "vgg16"]
    assert CPU_SMOKE.models(everything) == ["resnet18", "squeezenet1_1"]
    assert CPU_SMOKE.models(["bf16_nccl_transfer"]) == ["squeezenet1_1"]
    assert CPU_SMOKE.models(["compile_recompiles", "pytest_cuda", "inputs"]) == []  # skipped on a CPU; no model
    assert GPU.models(["compile_recompiles"]) == ["resnet18"]
    assert len(GPU.step_flags("speed")) == len(GPU.speed) + 1  # every case, and the cached features


def test_speed_goals():
    rows = {label: {"ratio": goal, "dtl_img_s": 1.0} for label, goal in SPEED_GOALS.items()}
    rows["finetune_224px_b256"]["dtl_fraction_of_bf16_matmul"] = 0.45
    rows["cached_features"] = {"dtl_img_s": CACHED_GOAL_IMG_S}
    assert speed_goals_missed(rows) == []
    rows["transfer_224px_b256"]["ratio"] = 1.19
    rows["cached_features"]["dtl_img_s"] = 999_999.0
    rows["finetune_224px_b256"]["dtl_fraction_of_bf16_matmul"] = 0.3
    assert speed_goals_missed(rows) == ["transfer_224px_b256 1.19x < 1.2x", "cached_features 999999 img/s < 1000000",
                                        "finetune_224px_b256 30% of the bf16 matmul rate < 45%"]
    assert speed_goals_missed({}) == []  # a case that did not run misses nothing
