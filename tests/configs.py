"""The tests' own small settings for the fields params.yaml must give (the pipeline's values live only there)."""

TINY_MODEL = dict(vocab_size=600, hidden_size=64, num_hidden_layers=2, intermediate_size=128, rope_theta=1e6)
DEMO = dict(train_pairs=120, objects_per_image=(2, 4), entities_per_title=(2, 4))
SYNTHESIZE = dict(teacher="template", prompt="full", none_fraction=0.4)
TRAINING = dict(learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0.0, max_steps=-1,
                per_device_train_batch_size=4, logging_steps=5, save_steps=50)
SFT = dict(TRAINING, dev_f1_every=0, dev_f1_max_new_tokens=256)
DIFFICULTY = dict(batch_size=8, max_samples=None)
EVALUATE = dict(max_new_tokens=256, batch_size=8)
SERVE = dict(max_new_tokens=256)

_SMALL = {"TinyModelConfig": TINY_MODEL, "DemoDataConfig": DEMO, "SynthesizeConfig": SYNTHESIZE, "SFTConfig": SFT,
          "GRPOConfig": TRAINING, "DifficultyConfig": DIFFICULTY, "EvaluateConfig": EVALUATE, "RegisterConfig": SERVE}


def small_config(config: type, **values):
    """`config` with the tests' small settings, overridden by `values`."""
    return config(**{**_SMALL[config.__name__], **values})
