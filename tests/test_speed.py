"""Fast by default: the FLOP count behind MFU (data.training_flops, shared with bench.py) against hand-counted
parameters, and --gradient_checkpointing auto's decision (data.recompute_plan) on the numbers of real shapes; on CPU
auto recomputes nothing and compiles nothing, true/false and --gradient_checkpointing_layers N still do what they did."""
import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLConfig

import bench
import data
import train_dpo
import train_grpo
import train_sft

GiB = 2**30


def config_3b():
    shape = bench.SHAPES["qwen2.5-vl-3b"]
    return Qwen2_5_VLConfig(text_config=shape["text"], vision_config=shape["vision"], tie_word_embeddings=True)


def test_parameter_counts_of_the_3b_shape_by_hand():
    # a decoder layer: q (2048 x 2048 + bias), k and v (2048 x 256 + bias), o (2048 x 2048), gate/up/down (3 x 2048 x
    # 11008), two norms; 36 of them and the final norm. The head: the (tied) 151936 x 2048 embeddings.
    layer = 2048 * 2048 + 2048 + 2 * (2048 * 256 + 256) + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048
    # vision: the patch embedding (3 x 2 x 14 x 14 -> 1280), 32 blocks (two norms, qkv and proj with biases, a gated
    # MLP of 3420 with biases), the merger (a norm, 5120 -> 5120 -> 2048 with biases)
    block = 2 * 1280 + 1280 * 3840 + 3840 + 1280 * 1280 + 1280 + 2 * (1280 * 3420 + 3420) + 3420 * 1280 + 1280
    vision = 3 * 2 * 14 * 14 * 1280 + 32 * block + 1280 + 5120 * 5120 + 5120 + 5120 * 2048 + 2048
    assert data.parameter_counts(config_3b()) == (36 * layer + 2048, 151936 * 2048, vision)
    assert (36 * layer + 2048, vision) == (2_774_773_760, 668_684_288)


@pytest.mark.parametrize("shape", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "qwen2.5-vl-3b"])
def test_training_flops_is_bench_formula(shape):
    """6 x body x tokens + 6 x head x labelled + 6 x layers x hidden x sum(len^2) + 6 x vision x patches (bench.py's
    module doc), and bench.flops_per_token is it per token."""
    config = config_3b() if shape == "qwen2.5-vl-3b" else AutoConfig.from_pretrained(data.resolve_model(shape))
    body, head, vision = data.parameter_counts(config)
    text = config.text_config
    for lengths, patches, labelled in [([100, 50], 64, 30), ([8192], 0, None), ([490] * 16, 16384, 3300)]:
        tokens = sum(lengths)
        expected = (6 * body * tokens + 6 * head * (tokens if labelled is None else labelled)
                    + 6 * text.num_hidden_layers * text.hidden_size * sum(n * n for n in lengths) + 6 * vision * patches)
        assert data.training_flops(config, lengths, patches, labelled) == expected
        assert data.training_flops(config, lengths, patches, labelled, counts=(body, head, vision)) == expected
    if shape == "qwen2.5-vl-3b":  # bench.py's count before it moved to data.py, for one 8192-token text row
        assert data.training_flops(config, [8192], 0) == 181_366_872_342_528
    else:
        model_dir = data.resolve_model(shape)
        assert bench.flops_per_token(model_dir, [100, 50], 64, 30) * 150 == pytest.approx(
            data.training_flops(config, [100, 50], 64, 30))


def test_flop_inputs_of_packed_and_padded_batches_and_of_examples():
    ids = lambda n: torch.arange(n)
    labels = lambda n, k: torch.cat([torch.full((n - k,), data.IGNORE), torch.ones(k, dtype=torch.long)])
    examples = [{"input_ids": ids(5), "labels": labels(5, 2), "position_ids": torch.zeros(3, 5, dtype=torch.long),
                 "pixel_values": torch.zeros(8, 4)},
                {"input_ids": ids(3), "labels": labels(3, 1), "position_ids": torch.zeros(3, 3, dtype=torch.long)}]
    assert data.flop_inputs(data.collate(examples, packing=True)) == ([5, 3], 8, 3)
    assert data.flop_inputs(data.collate(examples, packing=False)) == ([5, 3], 8, 3)  # the padding is not work
    assert data.flop_inputs(examples) == ([5, 3], 8, 3)


def test_activation_bytes_by_hand():
    # 3B decoder layer, per token: 2 bytes x (4 x 2048 (x, norms, residual) + 2 x 2048 (q, attention out) + 2 x 256
    # (k, v)) + 6 x 11008 (gate, up, their product); vision block, per patch: 2 x 10 x 1280 + 6 x 3420, 4 patches a token
    layer, layer_input, block, block_input = data.activation_bytes(config_3b(), 8192, compiled=True)
    assert layer == (2 * (4 * 2048 + 2 * 2048 + 2 * 256) + 6 * 11008) * 8192
    assert block == (2 * 10 * 1280 + 6 * 3420) * 4 * 8192
    assert (layer_input, block_input) == (2 * 2048 * 8192, 2 * 1280 * 4 * 8192)
    assert data.activation_bytes(config_3b(), 8192, compiled=False)[0] == int(1.25 * layer)
    # the patches a micro-batch can hold, when known (train_sft.py: its tokens x the most patches a token of any example)
    assert data.activation_bytes(config_3b(), 8192, True, patches=16384)[2:] == (block // 2, block_input // 2)


def plan_3b(held, trainable, master_bytes, tokens, budget=0.9 * 139 * GiB):
    """data.recompute_plan for the 3B shape on one GPU, as auto_checkpointing calls it (resharding after forward)."""
    config = config_3b()
    total, root, largest = 3_754_622_976, 311_164_928 + 36_708_608 + 1_505_280, 77_076_992
    unsharded = 2 * (root + 2 * largest) + 6 * min(trainable, root)
    fixed = data.fixed_bytes(held, trainable, master_bytes, 1, unsharded, tokens, 151936)
    return data.recompute_plan(budget, fixed, 36, 32, data.activation_bytes(config, tokens, compiled=True))


def test_recompute_plan_on_the_3b_shape():
    total = 3_754_622_976
    full_fp32 = dict(held=4 * total, trainable=total, master_bytes=4)
    # full fine-tuning, fp32 master weights, 16k-token rows: every vision block and some decoder layers, within budget
    layers, blocks, need = plan_3b(**full_fp32, tokens=16384)
    assert 0 < layers < 36 and blocks == 32 and need <= 0.9 * 139 * GiB
    # 8k-token rows: vision blocks only (nothing on text rows), no decoder layer
    layers, blocks, _ = plan_3b(**full_fp32, tokens=8192)
    assert layers == 0 and 0 < blocks < 32
    # bf16 master weights: no recomputation at 8k
    assert plan_3b(held=2 * total, trainable=total, master_bytes=2, tokens=8192)[:2] == (0, 0)
    # LoRA (bf16 frozen base, 18M fp32 adapters): nothing recomputes
    assert plan_3b(held=2 * total + 4 * 18_000_000, trainable=18_000_000, master_bytes=4, tokens=8192)[:2] == (0, 0)
    # a GPU too small for anything: everything recomputes
    assert plan_3b(**full_fp32, tokens=8192, budget=40 * GiB)[:2] == (36, 32)
    # more memory never recomputes more
    plans = [plan_3b(**full_fp32, tokens=16384, budget=b * GiB)[:2] for b in range(80, 200, 10)]
    assert plans == sorted(plans, reverse=True)


def test_recompute_plan_counts_what_a_recomputed_unit_keeps():
    """Units of 10 bytes keeping 1 when recomputed, 2 layers and 2 blocks, 100 fixed: the need of each plan by hand.
    The first units recompute, after the later ones have freed theirs; only when every layer recomputes does the
    rebuilt one add to the peak."""
    activations = (10, 1, 10, 1)
    assert data.recompute_plan(140, 100, 2, 2, activations) == (0, 0, 140)
    assert data.recompute_plan(139, 100, 2, 2, activations) == (0, 1, 100 + 20 + 10 + 1)
    assert data.recompute_plan(122, 100, 2, 2, activations) == (0, 2, 100 + 20 + 2)
    assert data.recompute_plan(113, 100, 2, 2, activations) == (1, 2, 100 + 10 + 1 + 2)
    assert data.recompute_plan(0, 100, 2, 2, activations) == (2, 2, 100 + 2 + 2 + 10)


@pytest.mark.parametrize("script", [train_sft, train_dpo, train_grpo], ids=lambda m: m.__name__)
def test_auto_is_the_default_and_recomputes_nothing_on_cpu(script, tmp_path):
    """--gradient_checkpointing auto and --compile auto by default; on CPU auto recomputes and compiles nothing
    (auto_checkpointing leaves the model as loaded); true, and auto or true with --gradient_checkpointing_layers N,
    as before; a --config file's booleans are read as true/false."""
    argv = ["--model", "tiny-qwen2.5-vl", "--output_dir", str(tmp_path)]
    cfg = script.parse_config(argv)
    assert (cfg.gradient_checkpointing, cfg.compile) == ("auto", "auto")
    device = torch.device("cpu")

    def recomputed(cfg):
        model, trainable, _ = script.load_model(cfg, device)
        script.auto_checkpointing(model, cfg, device, trainable, tokens=1024)
        return ([layer.gradient_checkpointing for layer in model.model.language_model.layers],
                [getattr(block, "gradient_checkpointing", False) for block in model.model.visual.blocks])

    assert recomputed(cfg) == ([False, False], [False, False])
    assert recomputed(script.parse_config(argv + ["--gradient_checkpointing", "true"])) == ([True, True], [True, True])
    for mode in ("auto", "true"):
        cfg = script.parse_config(argv + ["--gradient_checkpointing", mode, "--gradient_checkpointing_layers", "1"])
        assert recomputed(cfg) == ([True, False], [True, True])
    cfg = script.parse_config(argv + ["--gradient_checkpointing", "false", "--gradient_checkpointing_layers", "1"])
    assert recomputed(cfg) == ([False, False], [False, False])
    config = tmp_path / "c.yaml"
    config.write_text("gradient_checkpointing: true\ncompile: false\n")
    assert (lambda c: (c.gradient_checkpointing, c.compile))(script.parse_config(argv + ["--config", str(config)])) == (
        "true", "false")
    with pytest.raises(SystemExit):
        script.parse_config(argv + ["--compile", "sometimes"])


def test_progress_note():
    assert train_sft.progress_note(40, 250, 1.2) == "step 40/250 (16%) 1.20 s/step, ETA 4m12s"
    assert train_sft.progress_note(10, 5010, 3.0) == "step 10/5010 (0%) 3.00 s/step, ETA 4h10m"
    assert train_sft.progress_note(250, 250, 1.2) == "step 250/250 (100%) 1.20 s/step, ETA 0m00s"


def test_parameter_counts_leave_the_training_models_attention_alone():
    """The scripts count FLOPs from the training model's own config, whose attention is theirs (varlen_flash on a
    GPU, unknown to a fresh model): the count builds a copy with sdpa, and the config keeps its attention."""
    import copy

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(data.resolve_model("tiny-qwen2.5-vl"))
    expected = data.parameter_counts(copy.deepcopy(config))
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation_internal = "varlen_flash"
    assert data.parameter_counts(config) == expected
    assert config._attn_implementation == config.text_config._attn_implementation == "varlen_flash"
