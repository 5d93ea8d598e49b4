"""Training curves of the SFT and GRPO stages: CSV files for `dvc plots`, one PNG per stage, both logged to MLflow.

SFT (`reports/sft/`): `loss.csv` (step, loss, learning rate; eval loss where logged) and `dev_f1.csv` (step,
micro F1, accuracy and invalid rate of greedy answers on a fixed dev sample, measured during training by
`DevF1Callback`). GRPO (`reports/grpo/`): `rewards.csv` (step, mean total reward, each reward component,
KL, the curriculum phase of the step's prompts) and `phases.csv` (per curriculum phase: steps, mean accuracy
reward = the pass rate of the rollouts, mean format reward, mean total reward).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """Rows as CSV with exactly `columns` (missing values left empty), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def sft_loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step: train loss and learning rate, or eval loss."""
    rows = []
    for entry in log_history:
        if "loss" in entry:
            rows.append({"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")})
        elif "eval_loss" in entry:
            rows.append({"step": entry["step"], "eval_loss": entry["eval_loss"]})
    return rows


def grpo_reward_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged GRPO step: the mean reward, its components, KL and the curriculum phase."""
    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue
        row = {"step": entry["step"], "reward": entry["reward"], "kl": entry.get("kl"),
               "phase": entry.get("curriculum/phase")}
        row.update({k.split("/")[1]: v for k, v in entry.items() if k.startswith("rewards/") and k.endswith("/mean")})
        rows.append(row)
    return rows


def phase_rows(reward_rows: list[dict]) -> list[dict]:
    """Per curriculum phase (rounded mean phase of the logged steps): steps, pass rate, format and total reward."""
    by_phase: dict[int, list[dict]] = {}
    for row in reward_rows:
        if row.get("phase") is not None:
            by_phase.setdefault(round(row["phase"]), []).append(row)

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return [{"phase": phase, "logged_steps": len(rows), "pass_rate": mean(rows, "accuracy"),
             "format": mean(rows, "format"), "reward": mean(rows, "reward")}
            for phase, rows in sorted(by_phase.items())]


INTEGER_X = ("step", "phase")  # x columns that only take whole values: their ticks are integers (no phase 0.5)


def plot_png(path: Path, panels: list[tuple[str, list[dict], str, Sequence[str]]]) -> None:
    """One PNG with a panel per (title, rows, x column, y columns)."""
    import matplotlib.pyplot as plt

    fig = make_figure(panels)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_figure(panels: list[tuple[str, list[dict], str, Sequence[str]]]):
    """The matplotlib Figure of `plot_png` (Agg backend), a panel per (title, rows, x column, y columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, x, ys) in zip(axes[0], panels):
        for y in ys:
            points = [(r[x], r[y]) for r in rows if r.get(y) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=y)
        ax.set_title(title)
        ax.set_xlabel(x)
        if x in INTEGER_X:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig


def write_sft_curves(out_dir: str | Path, log_history: list[dict], dev_points: list[dict]) -> dict[str, Path]:
    """`loss.csv`, `dev_f1.csv` and `curves.png` of an SFT run into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss = sft_loss_rows(log_history)
    write_csv(out / "loss.csv", loss, ("step", "loss", "eval_loss", "learning_rate"))
    write_csv(out / "dev_f1.csv", dev_points, ("step", "dev_f1", "dev_accuracy", "dev_invalid_rate"))
    plot_png(out / "curves.png", [("SFT loss", loss, "step", ("loss", "eval_loss")),
                                  ("SFT dev sample (greedy)", dev_points, "step",
                                   ("dev_f1", "dev_accuracy", "dev_invalid_rate"))])
    return {name: out / name for name in ("loss.csv", "dev_f1.csv", "curves.png")}


def write_grpo_curves(out_dir: str | Path, log_history: list[dict]) -> dict[str, Path]:
    """`rewards.csv`, `phases.csv` and `curves.png` of a GRPO run into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rewards = grpo_reward_rows(log_history)
    components = sorted({k for r in rewards for k in r} - {"step", "reward", "kl", "phase"})
    write_csv(out / "rewards.csv", rewards, ("step", "reward", *components, "kl", "phase"))
    phases = phase_rows(rewards)
    write_csv(out / "phases.csv", phases, ("phase", "logged_steps", "pass_rate", "format", "reward"))
    plot_png(out / "curves.png", [("GRPO rewards", rewards, "step", ("reward", *components)),
                                  ("GRPO per curriculum phase", phases, "phase", ("pass_rate", "format"))])
    return {name: out / name for name in ("rewards.csv", "phases.csv", "curves.png")}


def log_curves(paths: dict[str, Path], artifact_path: str = "curves") -> None:
    """The curve files as artifacts of the active MLflow run."""
    import mlflow

    for path in paths.values():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def dev_f1_callback(rows: list[dict], labels: Sequence[str], every: int, *, max_new_tokens: int, batch_size: int):
    """A TrainerCallback that scores greedy answers on SFT rows (prompt turns, images, gold `relation`) every
    `every` steps and at the end; its `points` hold step, dev_f1, dev_accuracy, dev_invalid_rate, also logged
    to the active MLflow run as `sft_dev_f1` etc. by step."""
    from transformers import TrainerCallback

    from morer1.generation import generate_from_messages
    from morer1.metrics import compute_metrics
    from morer1.parsing import parse_completion

    class DevF1Callback(TrainerCallback):
        def __init__(self):
            self.points: list[dict] = []

        def _measure(self, state, model, processing_class):
            texts = [c[0] for c in generate_from_messages(
                model, processing_class, [r["messages"][:-1] for r in rows], [r["images"] for r in rows],
                max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)]
            result = compute_metrics([r["relation"] for r in rows],
                                     [parse_completion(t, labels).label for t in texts], labels)
            point = {"step": state.global_step, "dev_f1": result["f1"], "dev_accuracy": result["accuracy"],
                     "dev_invalid_rate": result["invalid_rate"]}
            self.points.append(point)
            if state.is_world_process_zero:
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.log_metrics({f"sft_{k}": v for k, v in point.items() if k != "step"},
                                       step=state.global_step)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            done = state.max_steps and state.global_step >= state.max_steps
            if rows and (state.global_step % every == 0 or done):
                if not self.points or self.points[-1]["step"] != state.global_step:
                    self._measure(state, model, processing_class)
            return control

    return DevF1Callback()
