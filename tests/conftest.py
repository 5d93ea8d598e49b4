import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _isolate(mp: pytest.MonkeyPatch, state: Path) -> None:
    mp.setenv("MORER1_STATE_DIR", str(state))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MORER1_PARENT_RUN_ID", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _session_state(tmp_path_factory):
    """Module-scoped fixtures (which run before per-test fixtures) track into a session store, never the repo's."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("session-state"))
        yield


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Every test tracks into its own MLflow store and never sees a pipeline parent run."""
    _isolate(monkeypatch, tmp_path / ".state")


class Killed(Exception):
    """Raised by the `kill_after_checkpoint` fixture: the training "dies" just after a checkpoint is complete."""


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """`with kill_after_checkpoint(step): train(...)`: the training dies (raises Killed, which the block expects and
    absorbs) right after `checkpoint-<step>` is complete, as a job killed at that moment. An MLflow run the trainer
    opened on its own is ended as KILLED, so that the next training in this process opens a new one."""
    from contextlib import contextmanager

    from transformers.trainer_callback import CallbackHandler

    original = CallbackHandler.on_save

    @contextmanager
    def kill(step: int):
        def on_save(self, args, state, control):
            control = original(self, args, state, control)
            if state.global_step == step:
                raise Killed(f"killed just after checkpoint-{step}")
            return control

        with monkeypatch.context() as mp:
            mp.setattr(CallbackHandler, "on_save", on_save)
            with pytest.raises(Killed):
                yield
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")

    return kill


@pytest.fixture
def weights_at_resume(monkeypatch):
    """A list that gets (checkpoint folder, the model's state dict) each time a trainer resumes, taken right after the
    checkpoint's weights were loaded: the weights the resumed training starts from."""
    import morer1.training

    seen = []
    original = morer1.training.load_checkpoint_weights

    def spy(model, checkpoint):
        n = original(model, checkpoint)
        seen.append((Path(checkpoint), {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return n

    monkeypatch.setattr(morer1.training, "load_checkpoint_weights", spy)
    return seen


@pytest.fixture
def checkpoint_state():
    """`checkpoint_state(checkpoint, base_model)`: the state dict transformers' (or, for a LoRA checkpoint, peft's)
    own from_pretrained loads from a Trainer checkpoint, with the adapters saved in its subfolders (e.g. GRPO's `ref`):
    what a resumed model must start from."""

    def load(checkpoint, base_model):
        from transformers import AutoModelForImageTextToText

        checkpoint = Path(checkpoint)
        if (checkpoint / "adapter_model.safetensors").is_file():
            from peft import PeftModel

            base = AutoModelForImageTextToText.from_pretrained(base_model, local_files_only=True)
            model = PeftModel.from_pretrained(base, checkpoint)
            for sub in sorted(checkpoint.glob("*/adapter_model.safetensors")):
                model.load_adapter(sub.parent, adapter_name=sub.parent.name)
            return model.state_dict()
        return AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).state_dict()

    return load
