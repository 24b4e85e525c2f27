"""The helpers that the train scripts copy on purpose (each script reads alone: ../shared/DESIGN.md) are identical in
source, so the copies cannot drift apart."""
import inspect

import pytest

import train_dpo
import train_grpo
import train_sft

# in train_sft.py, train_dpo.py and train_grpo.py
COPIES = ["read_config", "setup_distributed", "all_reduce", "check_output_dir", "checkpoint_size", "pretrained",
          "load_model", "shard_model", "model_inputs", "chunk_logps", "token_logps", "clip_grad_norm", "optimizer_step",
          "lr_lambda", "due", "checkpoint_dirs", "save_checkpoint", "load_checkpoint", "open_log", "auto_checkpointing",
          "progress_note"]
CONSTANTS = ["NOT_COPIED"]  # the base model's files a checkpoint leaves out
# in train_sft.py and train_dpo.py only: evaluation by greedy replies, and the DataLoader workers
SFT_DPO_COPIES = ["init_worker", "generate", "evaluate_accuracy"]
# in train_dpo.py and train_grpo.py only: the frozen reference model
DPO_GRPO_COPIES = ["load_reference"]


@pytest.mark.parametrize("name", COPIES)
@pytest.mark.parametrize("script", [train_dpo, train_grpo], ids=lambda m: m.__name__)
def test_helper_is_identical_to_train_sft(script, name):
    assert inspect.getsource(getattr(script, name)) == inspect.getsource(getattr(train_sft, name))


@pytest.mark.parametrize("name", CONSTANTS)
@pytest.mark.parametrize("script", [train_dpo, train_grpo], ids=lambda m: m.__name__)
def test_constant_is_identical_to_train_sft(script, name):
    assert getattr(script, name) == getattr(train_sft, name)


@pytest.mark.parametrize("name", SFT_DPO_COPIES)
def test_sft_and_dpo_helper_is_identical(name):
    assert inspect.getsource(getattr(train_dpo, name)) == inspect.getsource(getattr(train_sft, name))


@pytest.mark.parametrize("name", DPO_GRPO_COPIES)
def test_dpo_and_grpo_helper_is_identical(name):
    assert inspect.getsource(getattr(train_grpo, name)) == inspect.getsource(getattr(train_dpo, name))
