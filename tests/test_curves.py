"""Training curves: rows read from the trainers' log history, CSV files for dvc plots, one PNG per stage."""

import csv

from morer1 import curves

SFT_LOG = [{"step": 10, "loss": 5.0, "learning_rate": 1e-3}, {"step": 20, "loss": 2.5, "learning_rate": 9e-4},
           {"step": 20, "eval_loss": 2.7}, {"step": 20, "train_runtime": 3.0}]
GRPO_LOG = [
    {"step": 2, "reward": 0.5, "rewards/format/mean": 1.0, "rewards/accuracy/mean": 0.25, "kl": 0.0,
     "curriculum/phase": 0.0, "loss": 0.1},
    {"step": 4, "reward": 0.7, "rewards/format/mean": 1.0, "rewards/accuracy/mean": 0.75, "kl": 0.01,
     "curriculum/phase": 0.0, "loss": 0.1},
    {"step": 6, "reward": 0.2, "rewards/format/mean": 0.5, "rewards/accuracy/mean": 0.0, "kl": 0.02,
     "curriculum/phase": 1.0, "loss": 0.1},
    {"step": 6, "train_runtime": 9.0},
]


def _read(path):
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sft_curves_hold_every_logged_loss_and_the_dev_points(tmp_path):
    points = [{"step": 10, "dev_f1": 0.1, "dev_accuracy": 0.7, "dev_invalid_rate": 0.2},
              {"step": 20, "dev_f1": 0.4, "dev_accuracy": 0.8, "dev_invalid_rate": 0.0}]
    paths = curves.write_sft_curves(tmp_path / "sft", SFT_LOG, points)
    loss = _read(paths["loss.csv"])
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in loss] == [("10", "5.0", ""), ("20", "2.5", ""),
                                                                       ("20", "", "2.7")]
    assert [r["dev_f1"] for r in _read(paths["dev_f1.csv"])] == ["0.1", "0.4"]
    assert paths["curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_curves_give_each_reward_component_and_the_pass_rate_per_phase(tmp_path):
    paths = curves.write_grpo_curves(tmp_path / "grpo", GRPO_LOG)
    rewards = _read(paths["rewards.csv"])
    assert list(rewards[0]) == ["step", "reward", "accuracy", "format", "kl", "phase"]
    assert [r["accuracy"] for r in rewards] == ["0.25", "0.75", "0.0"]
    phases = _read(paths["phases.csv"])
    assert [(p["phase"], p["logged_steps"], float(p["pass_rate"]), float(p["format"])) for p in phases] == [
        ("0", "2", 0.5, 1.0), ("1", "1", 0.0, 0.5)]
    assert paths["curves.png"].stat().st_size > 1000


def test_empty_histories_still_write_headers_and_a_picture(tmp_path):
    paths = curves.write_grpo_curves(tmp_path, [])
    assert paths["phases.csv"].read_text().startswith("phase,logged_steps,pass_rate")
    assert paths["curves.png"].exists()


def test_phase_and_step_axes_have_integer_ticks(tmp_path, monkeypatch):
    """The per-phase panel of GRPO's curves.png ticks phases 0 and 1, not 0.5 or 1.5 (the figure is read back from
    matplotlib as it is saved)."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    curves.write_grpo_curves(tmp_path, GRPO_LOG)
    (fig,) = saved
    rewards_ax, phase_ax = fig.axes[:2]
    assert phase_ax.get_xlabel() == "phase" and rewards_ax.get_xlabel() == "step"
    for ax in (rewards_ax, phase_ax):
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_xlabel(), ticks)
    lo, hi = phase_ax.get_xlim()
    assert [t for t in phase_ax.get_xticks() if lo <= t <= hi] == [0, 1]
