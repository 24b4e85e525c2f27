"""
bench.py: real-shaped Qwen-VL models with random weights, for speed and scale checks on a GPU (nothing downloaded).

    python bench.py build --shape qwen2.5-vl-3b --out /tmp/qwen2.5-vl-3b     # write the checkpoint folder
    torchrun --nproc_per_node 2 train_sft.py --model /tmp/qwen2.5-vl-3b ...  # then train it like any model

The checkpoint has the real architecture and sizes (config values from the published config.json of each model)
and the tiny models' tokenizer and processor, whose special tokens have the real Qwen names.
"""
import argparse
import json
import os
import shutil

import torch

import data

SHAPES = {
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2)),
    "qwen2.5-vl-7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2)),
}


def build(shape, out_dir, seed=0):
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLConfig

    tiny = data.resolve_model("tiny-qwen2.5-vl")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                           "<|vision_start|>", "<|vision_end|>")}
    spec = SHAPES[shape]
    text = dict(spec["text"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for name in os.listdir(tiny):  # tokenizer, processor and chat template of the tiny model
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny, name), out_dir)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters written to {out_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a random-weight checkpoint of a real model's shape")
    b.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-vl-3b")
    b.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.shape, args.out)


if __name__ == "__main__":
    main()
