"""The policy's rollouts, as the difficulty and GRPO stages both draw and score them (params section `rollout`).

Difficulty samples `num_generations` rollouts per fact from `model` exactly as GRPO will (same temperature,
length and plain sampling) and counts a rollout as passed when GRPO's accuracy reward, built from the same
`rewards`, pays it 1. So the pools (solved, learnable, hard) are defined by the reward GRPO optimises: a solved
fact is one whose GRPO group would get equal accuracy rewards.
"""

from __future__ import annotations

from pydantic import Field

from morer1.params import StageConfig
from morer1.rewards import RewardsConfig

# Plain temperature sampling, no truncation: what difficulty's generate and TRL's GRPOTrainer both use.
PLAIN_SAMPLING = {"top_p": 1.0, "top_k": 0}


class RolloutConfig(StageConfig):
    """How the policy's rollouts are sampled and scored, shared by the difficulty and GRPO stages."""

    model: str = Field("models/sft", description="Policy folder the rollouts are sampled from: the model GRPO starts "
                                                "from (the SFT model).")
    num_generations: int = Field(
        4, ge=2, description="Rollouts per prompt: GRPO's group size and difficulty's k (its pass rate is passes / k).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of the rollouts.")
    max_completion_length: int = Field(160, ge=1, description="Longest rollout, in tokens.")
    rewards: RewardsConfig = Field(
        default_factory=RewardsConfig,
        description="Rewards of a rollout: GRPO optimises their weighted sum; difficulty counts a pass when the "
                    "accuracy reward pays 1.")


def log_params(rollout: RolloutConfig) -> None:
    """The rollout config as `rollout.*` params of the active MLflow run."""
    import mlflow

    from morer1 import tracking

    mlflow.log_params(tracking.flat_params("rollout", rollout))
