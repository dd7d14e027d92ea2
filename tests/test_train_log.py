"""The JSONL run log: one line per step, with the documented fields and consistent values."""

import pytest
import torch
from test_train_support import EVIT, PATCHES, patched_model, quiet_config, random_dataset

import tokensieve as ts
from tokensieve.train import LOG_FIELDS, WarmupCosine, cross_entropy, fit, read_log

# The fields docs/training.md lists; changing them is a change of the log format.
DOCUMENTED_FIELDS = ("step", "epoch", "lr", "loss", "loss_task", "loss_keep_ratio", "loss_distill",
                     "kept_rate", "keep_per_stage", "grad_norm", "seconds", "eval", "method_losses")


def test_the_log_has_one_line_per_step_with_the_documented_fields(tmp_path):
    config = quiet_config(steps=5, warmup_steps=2, log_path=str(tmp_path / "log.jsonl"), eval_every=2)
    evaluated = []

    def evaluate(model):
        evaluated.append(model.training)
        return {"accuracy": 0.5}

    fit(patched_model(), random_dataset(24), cross_entropy, config, evaluate=evaluate)
    lines = read_log(tmp_path / "log.jsonl")

    assert LOG_FIELDS == DOCUMENTED_FIELDS
    assert [tuple(line) for line in lines] == [DOCUMENTED_FIELDS] * 5
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["epoch"] for line in lines] == [0, 0, 0, 1, 1]  # 24 samples: 3 batches of 8 per epoch
    schedule = WarmupCosine(5, 2, config.min_lr_ratio)
    assert [line["lr"] for line in lines] == pytest.approx([config.lr * schedule(s) for s in range(5)])
    for line in lines:
        weighted = (config.task_weight * line["loss_task"]
                    + config.keep_ratio_weight * line["loss_keep_ratio"]
                    + config.distill_weight * line["loss_distill"])
        assert line["loss"] == pytest.approx(weighted, abs=1e-6)
        assert len(line["keep_per_stage"]) == 2
        assert all(0.0 <= share <= 1.0 for share in line["keep_per_stage"])
        # kept rate = (CLS + tokens kept by the last stage) / input tokens
        assert line["kept_rate"] == pytest.approx((1 + PATCHES * line["keep_per_stage"][-1]) / (1 + PATCHES))
        assert line["grad_norm"] > 0 and line["seconds"] > 0
    assert [line["eval"] for line in lines] == [None, {"accuracy": 0.5}, None, {"accuracy": 0.5},
                                                {"accuracy": 0.5}]
    assert evaluated == [False] * 3  # evaluation runs in eval mode


def test_a_method_without_keep_decisions_logs_none_for_their_loss(tmp_path):
    model = patched_model(EVIT)
    config = quiet_config(train="model", steps=2, log_path=str(tmp_path / "log.jsonl"), distill_weight=0.0)
    fit(model, random_dataset(16), cross_entropy, config)
    with torch.no_grad(), ts.trace(model) as traces:
        model.eval()(random_dataset(2).tensors[0])
    expected_rate = traces[0].kept_tokens()[-1, 0].item() / traces[0].input_tokens
    for line in read_log(tmp_path / "log.jsonl"):
        assert line["loss_keep_ratio"] is None and line["keep_per_stage"] is None
        assert line["loss_distill"] is None
        assert line["loss"] == line["loss_task"]
        assert line["kept_rate"] == pytest.approx(expected_rate)
        assert line["kept_rate"] < 1.0
