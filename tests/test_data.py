"""data.py by comparison: packed rows against examples run one by one, our vision token counts against transformers'
image processor, every input format against the others, bad records against their messages, and the plan helpers."""

import copy
import functools
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import IMAGE_SIZES, noise_image, run_torchrun

IGNORE = data.IGNORE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads; on a busy 2-core machine, spinning threads cost much more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoders(tiny_model_paths):
    """One Encoder per tiny model, with the bounds of its own processor (MIN_PIXELS / MAX_PIXELS of the shell ignored)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MIN_PIXELS", raising=False)
        mp.delenv("MAX_PIXELS", raising=False)
        return {path: data.Encoder(path) for path in tiny_model_paths.values()}


@pytest.fixture
def encoder(encoders, tiny_model_path):
    return encoders[tiny_model_path]


@functools.lru_cache(maxsize=None)
def load_model(path, attn_implementation):
    from transformers import AutoModelForImageTextToText

    implementation = "sdpa" if attn_implementation == "varlen" else attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=implementation)
    if attn_implementation == "varlen":
        data.use_varlen_attention(model)
    return model.eval()


def sft(content, reply, images=(), videos=(), system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}, {"role": "assistant", "content": reply}]
    return data.Sample(messages=messages, images=list(images), videos=list(videos), source="memory:1")


def label_logps(model, batch):
    """log p(label) at every labelled position, in row order. use_cache=False: with a cache, transformers does not
    derive the packed (block-diagonal) mask from the text positions, and attention would cross examples."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch.get("attention_mask"), use_cache=False,
                       **{key: batch.get(key) for key in data.VISION_KEYS + data.PACKED_KEYS}).logits
    labels = batch["labels"]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logps[labels != IGNORE]


def one_by_one(model, example):
    batch = dict(example, input_ids=example["input_ids"][None], labels=example["labels"][None],
                 position_ids=example["position_ids"][:, None])
    return label_logps(model, batch)


def mixed_samples(media):
    """Single image, two images of different sizes, a video, text only, and a two-turn chat with a late image."""
    return [
        sft("<image>how many circles", "three", [media["square.png"]]),
        sft("<image>this <image>which colour", "red and blue", [media["wide.png"], media["tall.png"]]),
        sft("<video>describe this video", "a frame of red", videos=[media["video.avi"]]),
        sft("what is one two", "three", system="please count"),
        data.Sample(messages=[{"role": "user", "content": "how many"}, {"role": "assistant", "content": "two"},
                              {"role": "user", "content": "<image>and this picture"}, {"role": "assistant", "content": "one"}],
                    images=[media["big.png"]], source="memory:2"),
    ]


@pytest.fixture(scope="module")
def mixed_examples(encoders, media):
    return {path: [enc(s) for s in mixed_samples(media)] for path, enc in encoders.items()}


# ----------------------------------------------------------------------------- 1. packed == one by one


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "varlen"])
def test_packed_and_padded_equal_one_by_one(tiny_model_path, mixed_examples, attn_implementation):
    model = load_model(tiny_model_path, attn_implementation)
    examples = mixed_examples[tiny_model_path]
    assert {"pixel_values", "pixel_values_videos"} <= set().union(*examples)  # images and a video are in the mix
    single = torch.cat([one_by_one(model, e) for e in examples])
    assert len(single) > 20
    packed_batch = data.collate(examples, packing=True)
    assert packed_batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert packed_batch["position_ids"].shape[:2] == (4, 1)
    assert packed_batch["cu_seqlens"].tolist() == np.cumsum([0] + [len(e["input_ids"]) for e in examples]).tolist()
    packed = label_logps(model, packed_batch)
    padded = label_logps(model, data.collate(examples, packing=False))
    assert (packed - single).abs().max() < 1e-4
    assert (padded - single).abs().max() < 1e-4
    # another order in the row: the same per-example values
    order = [3, 1, 4, 0, 2]
    reordered = label_logps(model, data.collate([examples[i] for i in order], packing=True))
    expected = torch.cat([one_by_one(model, examples[i]) for i in order])
    assert (reordered - expected).abs().max() < 1e-4


def test_varlen_attention_sees_every_boundary(tiny_model_path, mixed_examples):
    """With varlen attention, every vision block gets its images' / windows' boundaries and every decoder layer the
    packed row's; nothing falls back to one attention over the whole row."""
    from transformers import AttentionInterface

    model, calls = load_model(tiny_model_path, "varlen"), {"vision": 0, "packed": 0, "other": 0}

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls["vision" if "cu_seq_lens_q" in kwargs else "packed" if "packed_cu_seqlens" in kwargs else "other"] += 1
        return data.varlen_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(data.VARLEN_ATTENTION, spy)
    try:
        label_logps(model, data.collate(mixed_examples[tiny_model_path], packing=True))
    finally:
        AttentionInterface.register(data.VARLEN_ATTENTION, data.varlen_attention)
    assert calls["packed"] == model.config.text_config.num_hidden_layers
    assert calls["vision"] >= model.config.vision_config.depth and calls["other"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch's variable-length kernel runs on CUDA"))])
def test_shared_prompt_attention_equals_the_pair_run_apart(device, monkeypatch):
    """The rejected reply's queries, attending to the chosen example's prompt keys (packed_key_index), get what they
    get in the rejected example alone: on CPU through SDPA with a bottom-right causal mask, on the GPU through the
    flash kernel, whose causal mask must align a query with the last of its keys. The check train_dpo.py runs on a
    GPU before training fails where the mask is aligned top-left (the reply's queries would see the prompt's first
    keys only)."""
    assert data.shared_prompt_attention_error(torch.device(device)) < (1e-5 if device == "cpu" else 2e-2)
    if device == "cpu":  # SDPA's own causal mask, aligned top-left, in place of the bottom-right one
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, attn_mask=None, is_causal=False,
                            scale=None: sdpa(q, k, v, is_causal=is_causal or attn_mask is not None, scale=scale))
        assert data.shared_prompt_attention_error(torch.device(device)) > 0.1


def test_varlen_attention_decodes_a_grouped_query_token_as_sdpa_does():
    """One new token over a KV cache with padding masked out (generation under grouped-query attention): the grouped
    path gives transformers' SDPA result, which copies the key/value heads per query head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.ones(3, 1, 1, 12, dtype=torch.bool)  # a static cache's mask may be longer than the keys given
    mask[0, ..., :4] = mask[2, ..., 7:] = False
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4
    ours, _ = data.varlen_attention(module, query, key, value, mask, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask[..., :10], scaling=0.3)
    assert ours.shape == expected.shape == (3, 1, 8, 16)
    assert (ours - expected).abs().max() < 1e-5
    assert (ours - data.varlen_attention(module, query, key, value, None, scaling=0.3)[0]).abs().max() > 1e-2  # the mask counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's variable-length kernel runs on CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["packed-row", "vision"])
def test_compiled_varlen_attention_is_one_graph_for_every_batch(causal):
    """Under torch.compile the GPU path traces whole (fullgraph: no graph break between the layer and its attention)
    and is compiled once for rows of different lengths, counts and longest sequences; output and gradients equal
    the eager call's and SDPA's one sequence at a time."""
    from torch._dynamo.testing import CompileCounterWithBackend

    module = torch.nn.Module()
    module.is_causal = causal

    def attend(query, key, value, cu_seqlens, max_seqlen):  # token-major [1, T, heads, 64] in, as in the layers
        bounds = {"packed_cu_seqlens": cu_seqlens, "packed_max_seqlen": max_seqlen} if causal else \
            {"cu_seq_lens_q": cu_seqlens, "max_length_q": max_seqlen}
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        return data.varlen_attention(module, query, key, value, None, scaling=0.3, **bounds)[0]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    # 8 query heads and 2 key/value heads: no row below has 8 or 2 boundaries, which torch would take for one size
    for lengths in ([5, 9, 2], [7, 3, 1, 6, 12], [11, 4, 3, 3]):
        cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
        qkv = [torch.randn(1, sum(lengths), heads, 64, generator=g, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for heads in (8, 2, 2)]  # grouped-query keys and values
        out = compiled(*qkv, cu_seqlens, max(lengths))
        grads = torch.autograd.grad(out.float().square().sum(), qkv)
        eager = attend(*qkv, cu_seqlens, max(lengths))
        eager_grads = torch.autograd.grad(eager.float().square().sum(), qkv)
        q, k, v = (x[0].repeat_interleave(8 // x.shape[2], dim=1) for x in qkv)
        reference = data._sdpa_per_sequence(q, k, v, cu_seqlens, cu_seqlens, causal, 0.3)
        assert out.shape == (1, sum(lengths), 8, 64)
        assert (out[0] - reference).abs().max() < 2e-2
        assert torch.equal(out, eager) and all(torch.equal(a, b) for a, b in zip(grads, eager_grads))
    assert counter.frame_count == 1


def test_positions_equal_the_models_own(tiny_model_path, mixed_examples, encoders):
    """Our position_ids give the logits the model gives when it computes the multimodal rope positions itself."""
    model, encoder = load_model(tiny_model_path, "sdpa"), encoders[tiny_model_path]
    for example in mixed_examples[tiny_model_path]:
        ids = example["input_ids"][None]
        vision = {key: example.get(key) for key in data.VISION_KEYS}
        mm_token_type_ids = (ids == encoder.image_pad).int() + 2 * (ids == encoder.video_pad).int()
        if encoder.model_type != "qwen3_vl":  # Qwen2.5-VL spaces video frames in time by seconds per temporal patch
            vision["second_per_grid_ts"] = example.get("second_per_grid_ts")
        with torch.no_grad():
            theirs = model(input_ids=ids, mm_token_type_ids=mm_token_type_ids, use_cache=False, **vision).logits
            vision.pop("second_per_grid_ts", None)
            ours = model(input_ids=ids, position_ids=example["position_ids"][:, None], use_cache=False, **vision).logits
        model.model.rope_deltas = None  # the model keeps the deltas of its last call for generation
        assert (ours - theirs).abs().max() < 1e-5
    assert any(not torch.equal(e["position_ids"][0], e["position_ids"][1]) for e in mixed_examples[tiny_model_path])


def test_vision_windows_reach_the_vision_tower_and_match_its_own(tiny_model_path, encoders, mixed_examples):
    """data.vision_windows (Qwen2.5-VL's window order, built in the DataLoader worker) gives the logits the model
    gets when it builds the order itself, and the model does use it (a wrong order changes them); other models,
    and batches with both images and videos, get none."""
    images = [e for e in mixed_examples[tiny_model_path] if "pixel_values" in e]
    batch = data.collate(images, packing=True)
    windows = data.vision_windows(batch, encoders[tiny_model_path].config)
    if encoders[tiny_model_path].model_type != "qwen2_5_vl":
        assert windows == {}
        return
    assert set(windows) == set(data.WINDOW_KEYS)
    mixed = data.collate(mixed_examples[tiny_model_path], packing=True)
    assert data.vision_windows(mixed, encoders[tiny_model_path].config) == {}  # images and a video
    model = load_model(tiny_model_path, "varlen")
    logits = lambda extra: model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                 **{k: batch.get(k) for k in data.VISION_KEYS + data.PACKED_KEYS}, **extra).logits
    with torch.no_grad():
        own, given = logits({}), logits(windows)
        wrong = logits(dict(windows, window_index=windows["window_index"].flip(0)))
    assert torch.equal(own, given)
    assert not torch.allclose(own, wrong)


def test_packed_row_is_block_diagonal(tiny_model_path, encoders, media):
    """Changing the first example of a row leaves the second one's log-probabilities alone; with one running text
    position over the whole row (no packing detected) they do change, so this test can see a leak."""
    encoder, model = encoders[tiny_model_path], load_model(tiny_model_path, "sdpa")
    first = encoder(sft("how many circles", "three"))
    changed = encoder(sft("what colour is this picture please", "red"))
    second = encoder(sft("<image>which shape", "one", [media["wide.png"]]))
    alone = one_by_one(model, second)
    n = (first["labels"] != IGNORE).sum()
    after_first = label_logps(model, data.collate([first, second], packing=True))[n:]
    n_changed = (changed["labels"] != IGNORE).sum()
    after_changed = label_logps(model, data.collate([changed, second], packing=True))[n_changed:]
    assert (after_first - alone).abs().max() < 1e-5
    assert (after_changed - alone).abs().max() < 1e-5
    leaky = data.collate([first, second], packing=True)
    leaky["position_ids"][0] = torch.arange(leaky["position_ids"].shape[-1])
    assert (label_logps(model, leaky)[n:] - alone).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 2. vision tokens == transformers


def test_tiny_model_built_under_torchrun_is_complete(tmp_path):
    """`torchrun ... train_x.py` on a fresh machine builds the tiny model in every process after the process group
    is up; transformers then writes a model on rank 0 only, and the first process to finish renames its copy into
    place: every process must find the weights and config there (rank 1's copy had none before)."""
    script = tmp_path / "build.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {REPO!r})\nimport torch.distributed as dist\nimport data\n"
                      "dist.init_process_group('gloo')\npath = data.resolve_model('tiny-qwen2.5-vl')\n"
                      "print(dist.get_rank(), sorted(os.listdir(path)))\n")
    env = {**os.environ, "TINY_MODEL_DIR": str(tmp_path / "models"), "OMP_NUM_THREADS": "1"}
    p = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                     tmp_path / "models", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    listings = [line for line in p.stdout.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(listings) == 2
    for line in listings:
        assert "'config.json'" in line and "'model.safetensors'" in line, line


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = random.Random(0)
    sizes = [(10, 300), (5, 900), (1000, 7), (28, 28), (1, 1), (3000, 2000), (13, 14)]
    sizes += [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(300)]
    for factor, lo, hi in ((28, 3136, 16384), (32, 4096, 16384), (28, 56 * 56, 28 * 28 * 1280), (28, 20000, 20000)):
        for h, w in sizes:
            if max(h, w) / min(h, w) <= 200:
                assert data.smart_resize(h, w, factor, lo, hi) == smart_resize(h, w, factor, lo, hi), (h, w, factor, lo, hi)


@pytest.mark.parametrize("bounds", ["processor", "vision_config", "env", "vision_config_over_env"])
def test_image_tokens_equal_image_processor(tiny_model_path, media, bounds, monkeypatch):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_model_path)
    lo, hi = processor.size.shortest_edge, processor.size.longest_edge
    monkeypatch.delenv("MIN_PIXELS", raising=False)
    monkeypatch.delenv("MAX_PIXELS", raising=False)
    vision = data.VisionConfig()
    if bounds in ("env", "vision_config_over_env"):
        lo, hi = 1024, 4096
        monkeypatch.setenv("MIN_PIXELS", str(lo))
        monkeypatch.setenv("MAX_PIXELS", str(hi))
    if bounds in ("vision_config", "vision_config_over_env"):
        lo, hi = 20000, 60000
        vision = data.VisionConfig(min_pixels=lo, max_pixels=hi)
    encoder = data.Encoder(tiny_model_path, vision)
    merge = processor.merge_size
    for name in IMAGE_SIZES:
        example = encoder.encode(sft("<image>what is this", "a picture", [media[name]]))
        expected = processor(images=[Image.open(media[name])], min_pixels=lo, max_pixels=hi, return_tensors="pt")
        assert example["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist(), name
        assert torch.allclose(example["pixel_values"], expected["pixel_values"], atol=1e-6)
        n_tokens = int((example["input_ids"] == encoder.image_pad).sum())
        assert n_tokens == int(expected["image_grid_thw"].prod()) // merge**2, name
    assert (encoder.min_pixels, encoder.max_pixels) == (lo, hi)


def test_video_patches_equal_image_patches_of_a_still(tiny_model_path, media):
    """A video of two identical frames is one temporal patch: the same patches as the image processor gives for the
    frame as a still image (which it repeats temporal_patch_size times), so resize, normalise and patch order agree."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_model_path)
    encoder = data.Encoder(tiny_model_path, data.VisionConfig(fps=4, video_min_frames=2))
    patches, grid, _, _ = encoder.encode_video(media["still.avi"])
    frames, _, _ = data.read_video(media["still.avi"], 4, 2, 64)
    assert len(frames) == 2 and np.array_equal(frames[0], frames[1])
    lo, hi = min(encoder.min_pixels, encoder.vision.video_max_pixels), encoder.vision.video_max_pixels
    expected = processor(images=[Image.fromarray(frames[0])], min_pixels=lo, max_pixels=hi, return_tensors="pt")
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    assert tuple(frames.shape[1:3]) != tuple(int(x) * processor.patch_size for x in grid[0, 1:])  # it was resized
    assert patches.shape == expected["pixel_values"].shape
    assert (patches - expected["pixel_values"]).abs().max() < 1e-5


def test_patchify_order_matches_image_processor():
    """patchify on a 2-frame stack of one random array == the image processor's own patchify of that array."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = np.random.default_rng(0).standard_normal((3, 56, 112)).astype(np.float32)
    ours, grid = data.patchify(np.stack([image, image]), patch_size=14, temporal_patch_size=2, merge_size=2)
    theirs, gh, gw = Qwen2VLImageProcessorPil().patchify(image, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (1, gh, gw) and np.array_equal(ours, theirs)
    # an odd frame count is padded with the last frame
    three, grid3 = data.patchify(np.stack([image, image, image * 2]), 14, 2, 2)
    assert grid3 == (2, 4, 8) and np.array_equal(three[32:], data.patchify(np.stack([image * 2] * 2), 14, 2, 2)[0])


def test_video_token_count(tiny_model_path, encoder, media):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    example = encoder(sft("<video>describe", "a frame", videos=[media["video.avi"]]))
    frames, indices, video_fps = data.read_video(media["video.avi"], encoder.vision.fps, 4, 64)
    assert len(frames) == 4 and video_fps == 4  # 8 frames at 4 fps, sampled at 2 fps
    t, h, w = example["video_grid_thw"][0].tolist()
    assert t == len(frames) // 2
    expected_hw = data.smart_resize(56, 80, encoder.patch_size * encoder.merge_size, encoder.min_pixels,
                                    encoder.vision.video_max_pixels)
    assert (h * encoder.patch_size, w * encoder.patch_size) == expected_hw
    assert int((example["input_ids"] == encoder.video_pad).sum()) == t * h * w // encoder.merge_size**2
    assert example["pixel_values_videos"].shape[0] == t * h * w
    text = encoder.tokenizer.decode(example["input_ids"])
    if encoder.model_type == "qwen3_vl":  # a timestamp before each temporal patch, as transformers computes them
        stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, video_fps, 2)
        assert "".join(f"<{s:.1f} seconds><|vision_start|>" for s in stamps) in text.replace(
            "<|video_pad|>", "").replace("<|vision_end|>", "")
    else:  # seconds per temporal patch, as transformers' Qwen2.5-VL processor sets it (temporal_patch_size / fps)
        assert example["second_per_grid_ts"].tolist() == [2 / encoder.vision.fps]
        assert text.count("<|vision_start|>") == 1


def test_input_ids_equal_auto_processor(tiny_model_path, encoder, media, monkeypatch):
    """Images and a video through transformers' own processor (it needs torchvision): the same input_ids and grids."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(tiny_model_path)
    # frames as decord would sample them (4 of 8 at 4 fps), handed to both sides: no video decoder needed here
    frames = np.stack([np.asarray(noise_image(80, 56, seed=10 + i)) for i in range(4)])
    indices = np.array([0, 2, 5, 7])
    monkeypatch.setattr(data, "read_video", lambda *args, **kwargs: (frames, indices, 4.0))
    sample = sft("<image>this <image>which colour <video>", "red", [media["wide.png"], media["big.png"]], ["frames.avi"])
    example = encoder.encode(sample)
    images = [Image.open(p).convert("RGB") for p in sample.images]
    metadata = VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=indices.tolist())
    expected = processor(text=[encoder.render(sample)], images=images, videos=[frames], video_metadata=[metadata],
                         do_sample_frames=False, return_tensors="pt")
    assert example["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert example["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
    if "second_per_grid_ts" in expected:
        assert example["second_per_grid_ts"].tolist() == torch.as_tensor(expected["second_per_grid_ts"]).tolist()
    # torchvision resizes a little differently from PIL; a wrong patch order would differ by whole units
    assert (example["pixel_values"] - expected["pixel_values"].float()).abs().max() < 0.05
    assert (example["pixel_values_videos"] - expected["pixel_values_videos"].float()).abs().max() < 0.05
    expected_ids = expected["input_ids"][0].tolist()
    if encoder.model_type == "qwen3_vl":
        # transformers 5 keeps the template's <|vision_start|>...<|vision_end|> around the timestamped frames; Qwen's
        # reference (transformers 4.57, qwen-vl-utils), which the models were trained with, replaces it, as we do
        text = re.sub(r"<\|vision_start\|>(<[\d.]+ seconds>.*?<\|vision_end\|>)<\|vision_end\|>", r"\1",
                      processor.tokenizer.decode(expected_ids))
        expected_ids = processor.tokenizer.encode(text, add_special_tokens=False)
    assert example["input_ids"].tolist() == expected_ids


# ----------------------------------------------------------------------------- 3. every format, one encoding


def write_records(path, records):
    with open(path, "w") as f:
        if path.endswith(".json"):
            json.dump(records, f, indent=1)
        else:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def same_conversation(image, relative_image):
    system, q1, r1, q2, r2 = "please count", "how many circles", "three", "what colour", "red"
    turns = [("human", f"<image>{q1}"), ("gpt", r1), ("human", q2), ("gpt", r2)]
    roles = {"human": "user", "gpt": "assistant"}
    return {
        "ms-swift": {"system": system, "history": [[f"<image>{q1}", r1]], "query": q2, "response": r2, "images": [image]},
        "ms-swift no tag": {"system": system, "history": [[q1, r1]], "query": q2, "response": r2, "images": [image]},
        "sharegpt": {"conversations": [{"from": "system", "value": system}] + [{"from": f, "value": v} for f, v in turns],
                     "images": [image]},
        "sharegpt top-level system": {"system": system, "conversations": [{"from": f, "value": v} for f, v in turns],
                                      "images": [image]},
        "qwen official": {"conversations": [{"from": "system", "value": system}] +
                          [{"from": f, "value": v} for f, v in turns], "image": image},
        "messages": {"messages": [{"role": "system", "content": system}] +
                     [{"role": roles[f], "content": v} for f, v in turns], "images": [image]},
        "messages no tag": {"messages": [{"role": "system", "content": system}] +
                            [{"role": roles[f], "content": v.replace("<image>", "")} for f, v in turns], "images": [image]},
        "messages relative path": {"messages": [{"role": "system", "content": system}] +
                                   [{"role": roles[f], "content": v} for f, v in turns], "images": [relative_image]},
        "typed parts": {"messages": [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": r1}]},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": r2}]},
        "typed parts, image_url": {"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": r1}, {"role": "user", "content": q2}, {"role": "assistant", "content": r2}]},
        "typed parts, media in images": {"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": r1}, {"role": "user", "content": q2}, {"role": "assistant", "content": r2}],
            "images": [image]},
    }


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_every_format_encodes_identically(tiny_model_path, encoder, media, tmp_path, suffix):
    folder = os.path.dirname(media["square.png"])
    formats = same_conversation(media["square.png"], "square.png")
    path = write_records(str(tmp_path / f"data.{suffix}"), list(formats.values()))
    samples, errors = data.load_file(path, "sft", media_root=folder, check_media_files=True)
    assert errors == [] and len(samples) == len(formats)
    examples = {name: encoder(s) for name, s in zip(formats, samples)}
    reference = examples["ms-swift"]
    for name, example in examples.items():
        assert example["input_ids"].tolist() == reference["input_ids"].tolist(), name
        assert example["labels"].tolist() == reference["labels"].tolist(), name
        assert torch.equal(example["position_ids"], reference["position_ids"]), name
    # every assistant turn is labelled, with its <|im_end|>, and nothing else
    labelled = reference["labels"][reference["labels"] != IGNORE]
    assert encoder.tokenizer.decode(labelled) == "three<|im_end|>red<|im_end|>"
    # the image went before the first user text
    text = encoder.tokenizer.decode(reference["input_ids"])
    assert "user\n<|vision_start|><|image_pad|>" in text and "<|vision_end|>how many circles" in text


def test_vision_tokens_never_labelled(encoder, media):
    pads = (encoder.image_pad, encoder.video_pad)
    samples = [sft("<image><video>what", "this <image> here", [media["wide.png"], media["square.png"]], [media["video.avi"]]),
               data.Sample(messages=[], text="a <image> b <video> c", images=[media["tall.png"]],
                           videos=[media["video.avi"]], source="memory:1")]
    for sample in samples:
        example = encoder(sample)
        assert (example["input_ids"] == encoder.image_pad).any() and (example["input_ids"] == encoder.video_pad).any()
        assert not any(label in pads for label in example["labels"].tolist())


def test_cpt_labels_every_text_token(encoder, media, tmp_path):
    path = write_records(str(tmp_path / "cpt.jsonl"), [
        {"text": "<image>This picture has 3 circles.", "images": [media["wide.png"]]},
        {"text": "How many circles are there? There are 3 circles."}])
    samples, _ = data.load_file(path, "pretrain")
    for sample in samples:
        example = encoder(sample)
        ids, labels = example["input_ids"], example["labels"]
        is_pad = (ids == encoder.image_pad) | (ids == encoder.video_pad)
        expected = torch.where(is_pad[1:], IGNORE, ids[1:])  # shifted: labels[t] is token t + 1
        assert labels[:-1].tolist() == expected.tolist() and labels[-1] == IGNORE
        assert (labels != IGNORE).sum() == (~is_pad).sum() - 1  # every text token but the first, which has no context


def test_dpo_formats_agree(encoder, media, tmp_path):
    image = media["square.png"]
    user = "<image>how many circles"
    records = [
        {"query": user, "response": "three", "rejected_response": "two", "images": [image]},
        {"conversations": [{"from": "human", "value": user}], "chosen": "three", "rejected": "two", "images": [image]},
        {"conversations": [{"from": "human", "value": user}], "chosen": {"from": "gpt", "value": "three"},
         "rejected": {"from": "gpt", "value": "two"}, "images": [image]},
        {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": "three"}], "rejected": "two",
         "chosen": "three", "image": image},
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "three"}],
         "rejected_response": "two", "images": [image]},
        {"messages": [{"role": "user", "content": user}], "chosen": "three", "rejected": "two", "images": [image]},
        {"messages": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": "three"}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "two"}]}], "images": [image]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "how many circles"}]}],
         "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "three"}],
         "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "two"}]},
    ]
    samples, errors = data.load_file(write_records(str(tmp_path / "dpo.jsonl"), records), "dpo")
    assert errors == [] and len(samples) == len(records)
    for sample in samples:
        assert sample.rejected == "two" and sample.messages[-1] == {"role": "assistant", "content": "three"}
        assert [m["role"] for m in sample.messages] == ["user", "assistant"] and sample.images == [image]
    encode = lambda s, reply=None: encoder(s, reply=reply)
    chosen, rejected = encode(samples[0]), encode(samples[0], reply=samples[0].rejected)
    assert encoder.tokenizer.decode(chosen["labels"][chosen["labels"] != IGNORE]) == "three<|im_end|>"
    assert encoder.tokenizer.decode(rejected["labels"][rejected["labels"] != IGNORE]) == "two<|im_end|>"
    for sample in samples[1:]:
        assert encode(sample)["input_ids"].tolist() == chosen["input_ids"].tolist()
        assert encode(sample, reply=sample.rejected)["input_ids"].tolist() == rejected["input_ids"].tolist()


def test_rl_records_keep_extra_columns(encoder, media, tmp_path):
    image = media["square.png"]
    records = [
        {"messages": [{"role": "user", "content": "<image>how many circles"}], "images": [image], "solution": "3"},
        {"query": "<image>how many circles", "response": "three", "images": [image], "solution": "3"},
        {"conversations": [{"from": "human", "value": "how many circles"}, {"from": "gpt", "value": "three"}],
         "image": image, "solution": "3"},
    ]
    samples, errors = data.load_file(write_records(str(tmp_path / "rl.jsonl"), records), "rl")
    assert errors == []
    prompts = []
    for sample in samples:
        assert sample.extra == {"solution": "3"}
        assert sample.messages == [{"role": "user", "content": "<image>how many circles"}]
        prompt = encoder(sample, train_on="none", add_generation_prompt=True)
        assert (prompt["labels"] == IGNORE).all()
        assert encoder.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")
        prompts.append(prompt["input_ids"].tolist())
    assert prompts[0] == prompts[1] == prompts[2]
    # SFT keeps no extra columns
    assert data.record_to_sample(records[0] | {"messages": records[0]["messages"] + [
        {"role": "assistant", "content": "3"}]}, "sft").extra == {}


def test_jsonl_line_with_unicode_separators(tmp_path):
    """JSONL is split on newlines only: U+2028 and U+0085 inside a string are text, not line breaks."""
    records = [{"query": "a\u2028b\x85c", "response": "d"}, {"text": "second"}]
    path = write_records(str(tmp_path / "u.jsonl"), records)
    assert [line for line, _ in data._read_records(path)] == [1, 2]
    samples, errors = data.load_file(path, "sft")
    assert errors == [] and samples[0].messages[0]["content"] == "a\u2028b\x85c" and samples[1].source.endswith(":2")
    with open(path, "rb") as f:  # a byte-order mark, as Windows editors write it
        content = f.read()
    for name, raw in (("bom.jsonl", content), ("bom.json", json.dumps(records).encode())):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + raw)
        samples, errors = data.load_file(str(tmp_path / name), "sft")
        assert errors == [] and len(samples) == 2


def test_media_paths(media, tmp_path):
    """Absolute, relative to the data file, or relative to --media_root (which wins); URLs and missing files refused."""
    folder = os.path.dirname(media["square.png"])
    beside = tmp_path / "beside"
    beside.mkdir()
    Image.open(media["wide.png"]).save(beside / "square.png")  # same name, other picture, next to the data file
    path = write_records(str(beside / "d.jsonl"), [{"query": "hi", "response": "x", "images": [name]}
                                                  for name in (media["tall.png"], "square.png")])
    assert [s.images for s in data.load_file(path, "sft")[0]] == [[media["tall.png"]], [str(beside / "square.png")]]
    assert [s.images for s in data.load_file(path, "sft", media_root=folder)[0]] == [[media["tall.png"]],
                                                                                     [media["square.png"]]]
    with pytest.raises(data.BadRecord, match="is a URL"):
        data.resolve_media("https://example.com/a.png", path, None)
    with pytest.raises(data.BadRecord, match=f"not found .*{re.escape(folder)}.*--media_root"):
        data.resolve_media("nope.png", path, folder)


# ----------------------------------------------------------------------------- 4. bad records


def bad_cases(media):
    """(raw JSON line, the message it must produce), in file order; None: a good record."""
    good = {"query": "<image>how many", "response": "three", "images": [media["square.png"]]}
    return [
        (json.dumps(good), None),
        ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
        ('{"query": "caf\xe9", "response": "x"}'.encode("latin-1"), "not UTF-8"),
        (json.dumps({"prompt": "hi", "answer": "x"}), "unknown format"),
        (json.dumps({"query": "<image>hi", "response": "x", "images": ["no_such.png"]}), "not found"),
        (json.dumps({"query": "<image>hi", "response": "x", "images": [media["corrupt.jpg"]]}), "corrupt"),
        (json.dumps({"query": "<image>hi", "response": "x", "images": [media["empty.png"]]}), "empty (0 bytes)"),
        (json.dumps({"query": "<image><image>hi", "response": "x", "images": [media["square.png"]]}),
         "2 <image> tag(s) but 1 image(s)"),
        (json.dumps({"query": "<video>hi", "response": "x", "images": [media["square.png"]]}),
         "1 <video> tag(s) but 0 video(s)"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}),
         "no assistant reply (or an empty one)"),
        (json.dumps({"query": "hi"}), "no assistant reply"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                                  {"role": "assistant", "content": "x"}]}), "must alternate user, assistant"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "x"}]}), "must alternate user, assistant"),
        (json.dumps({"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
         "unknown role 'narrator'"),
        (json.dumps({"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]}),
         "unknown speaker 'narrator'"),
        (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
         "must be a string or a list of parts"),
        (json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}, {"role": "assistant", "content": "x"}]}),
         "has no type text, image or video"),
        (json.dumps(good), None),
    ]


def write_bad_jsonl(path, cases):
    lines = []
    for i, (raw, _) in enumerate(cases):
        lines.append(raw if isinstance(raw, bytes) else raw.encode())
        if i % 3 == 0:
            lines.append(b"")  # blank lines are skipped but still counted
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    # the line of each case
    line, numbers = 1, []
    for i in range(len(cases)):
        numbers.append(line)
        line += 2 if i % 3 == 0 else 1
    return numbers


def write_bad_json_array(path, cases):
    """The same cases as a JSON array, one element spread over several lines; invalid JSON last (it ends the array)."""
    text, numbers = "[\n", []
    body = [c for c in cases if not isinstance(c[0], bytes) and c[1] != "invalid JSON"]
    for raw, _ in body:
        numbers.append(text.count("\n") + 1)
        text += json.dumps(json.loads(raw), indent=1) + ",\n"
    numbers.append(text.count("\n") + 1)
    text += '{"query": "hi", "response": }\n]\n'
    with open(path, "w") as f:
        f.write(text)
    return body + [("", "invalid JSON")], numbers


def check_errors(path, cases, numbers, errors):
    expected = [(n, message) for (_, message), n in zip(cases, numbers) if message]
    assert len(errors) == len(expected), "\n".join(errors)
    for (line, message), error in zip(expected, errors):
        assert error.startswith(f"{path}:{line}: "), (error, line)
        assert message in error, (error, message)


def test_bad_records_jsonl(media, tmp_path, capsys):
    cases = bad_cases(media)
    path = str(tmp_path / "bad.jsonl")
    numbers = write_bad_jsonl(path, cases)
    samples, errors = data.load_file(path, "sft", skip_bad_records=True, check_media_files=True)
    check_errors(path, cases, numbers, errors)
    assert [s.source for s in samples] == [f"{path}:{numbers[0]}", f"{path}:{numbers[-1]}"]  # every good record kept
    # without skipping: the first bad record stops loading, with its file and line
    with pytest.raises(data.BadRecord, match=f"^{re.escape(path)}:{numbers[1]}: invalid JSON.*--skip_bad_records"):
        data.load_file(path, "sft")
    # data.py check prints every bad record with file:line, a summary, and exits 1
    assert data.main(["check", path]) == 1
    out = capsys.readouterr().out.splitlines()
    check_errors(path, cases, numbers, out[:-1])
    assert out[-1] == f"{len(cases)} record(s) checked, {len(cases) - 2} bad"


def test_bad_records_json_array(media, tmp_path, capsys):
    path = str(tmp_path / "bad.json")
    cases, numbers = write_bad_json_array(path, bad_cases(media))
    samples, errors = data.load_file(path, "sft", skip_bad_records=True, check_media_files=True)
    check_errors(path, cases, numbers, errors)
    assert len(samples) == 2
    assert data.main(["check", path]) == 1
    check_errors(path, cases, numbers, capsys.readouterr().out.splitlines()[:-1])
    # a non-UTF-8 byte in an array: the file cannot be decoded, and the error names the line
    (tmp_path / "latin1.json").write_bytes('[\n{"query": "a", "response": "b"},\n{"query": "caf\xe9", "response": "b"}\n]'
                                           .encode("latin-1"))
    with pytest.raises(data.BadRecord, match=r"latin1.json:3: not UTF-8"):
        data.load_file(str(tmp_path / "latin1.json"), "sft")
    assert data.load_file(str(tmp_path / "latin1.json"), "sft", skip_bad_records=True)[1][0].startswith(
        f"{tmp_path / 'latin1.json'}:3: not UTF-8")


def test_check_command_line(media, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    numbers = write_bad_jsonl(path, bad_cases(media))
    result = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "check", path], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{path}:{numbers[1]}: invalid JSON" in result.stdout and "bad" in result.stdout.splitlines()[-1]


def test_check_passes_on_demo_data(capsys):
    files = [data.demo_path(stage, split) for stage in ("sft", "cpt", "dpo") for split in ("train", "val")]
    assert data.main(["check", *files]) == 0
    assert data.main(["check", "--stage", "rl", data.demo_path("rl", "train"), data.demo_path("rl", "val")]) == 0
    assert data.main(["check", "--stage", "pretrain", data.demo_path("cpt", "val")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" 0 bad")
    for stage, file_stage in (("sft", "sft"), ("pretrain", "cpt"), ("dpo", "dpo"), ("rl", "rl")):
        samples, errors = data.load_file(data.demo_path(file_stage, "val"), stage, check_media_files=True)
        assert errors == [] and len(samples) == 100


def test_bad_media_found_while_measuring(encoder, media, tmp_path):
    """Training loads without opening media; a corrupt image is found when encoding, still named by file:line."""
    path = write_records(str(tmp_path / "d.jsonl"), [
        {"query": "<image>hi", "response": "x", "images": [media["square.png"]]},
        {"query": "<image>hi", "response": "x", "images": [media["corrupt.jpg"]]},
        {"query": "<image>hi", "response": "x", "images": [media["empty.png"]]}])
    samples, errors = data.load_file(path, "sft")
    assert errors == [] and len(samples) == 3
    kept, lengths, errors, _ = data.measure_lengths(samples, encoder, skip_bad_records=True)
    assert kept == [0] and [e.split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(data.BadRecord, match=f"^{re.escape(path)}:2: .*corrupt.jpg"):
        data.measure_lengths(samples, encoder)


# ----------------------------------------------------------------------------- 5. truncation, specs, splits, plans


def with_settings(encoder, **settings):
    encoder = copy.copy(encoder)
    for key, value in settings.items():
        setattr(encoder, key, value)
    return encoder


def test_truncation_strategies(encoders, tiny_model_paths, media):
    encoder = encoders[tiny_model_paths["tiny-qwen2.5-vl"]]
    long = sft("how many circles are in the image", " ".join(["three"] * 40))
    long.source = "long.jsonl:7"
    full = encoder(long)
    n = len(full["input_ids"])
    limit = n - 30
    with pytest.raises(data.BadRecord, match=f"long.jsonl:7: {n} tokens, above --max_length {limit}"):
        with_settings(encoder, max_length=limit)(long)
    assert with_settings(encoder, max_length=limit, truncation_strategy="delete")(long) is None
    assert with_settings(encoder, max_length=n, truncation_strategy="delete")(long)["input_ids"].tolist() == \
        full["input_ids"].tolist()  # at the limit: kept whole
    right = with_settings(encoder, max_length=limit, truncation_strategy="right")(long)
    assert right["input_ids"].tolist() == full["input_ids"][:limit].tolist()
    assert right["labels"][:-1].tolist() == full["labels"][: limit - 1].tolist() and right["labels"][-1] == IGNORE
    assert right["position_ids"].shape == (4, limit)
    left = with_settings(encoder, max_length=limit, truncation_strategy="left")(long)
    assert left["input_ids"].tolist() == full["input_ids"][-limit:].tolist()
    assert left["labels"].tolist() == full["labels"][-limit:].tolist()
    assert left["position_ids"][0].tolist() == list(range(limit))
    # vision tokens are never cut: the image sits at the start (left cuts it) and the end (right cuts it)
    image = sft("<image>how many circles are in the image", " ".join(["three"] * 40), [media["square.png"]])
    image_full = encoder(image)
    for strategy, limit in (("left", len(image_full["input_ids"]) - 30), ("right", 12)):
        with pytest.raises(data.BadRecord, match="would cut an image or video"):
            with_settings(encoder, max_length=limit, truncation_strategy=strategy)(image)
    kept = with_settings(encoder, max_length=len(image_full["input_ids"]) - 30, truncation_strategy="right")(image)
    assert (kept["input_ids"] == encoder.image_pad).sum() == (image_full["input_ids"] == encoder.image_pad).sum()


def test_dataset_specs(tmp_path):
    records = [{"query": f"question {i}", "response": f"answer {i}"} for i in range(10)]
    path = write_records(str(tmp_path / "ten.jsonl"), records)
    other = write_records(str(tmp_path / "other.json"), records[:4])
    queries = lambda samples: [s.messages[0]["content"] for s in samples]
    assert queries(data.load_dataset([path], "sft")) == [r["query"] for r in records]
    half = queries(data.load_dataset([f"{path}%50"], "sft", seed=0))
    assert len(half) == len(set(half)) == 5
    assert half == queries(data.load_dataset([f"{path}%50"], "sft", seed=0))  # the same with the same seed
    assert half != queries(data.load_dataset([f"{path}%50"], "sft", seed=1))
    three = queries(data.load_dataset([f"{path}#3"], "sft", seed=0))
    assert len(three) == len(set(three)) == 3
    up = queries(data.load_dataset([f"{path}#25"], "sft", seed=0))  # above the file's size: upsampled
    counts = [up.count(r["query"]) for r in records]
    assert len(up) == 25 and min(counts) == 2 and max(counts) == 3
    both = data.load_dataset([path, f"{other}%50"], "sft")
    assert len(both) == 12 and all(s.source.startswith(other) for s in both[10:])
    with pytest.raises(data.BadRecord, match="no usable records"):
        data.load_dataset([f"{path}#0"], "sft")


def test_split_dataset():
    samples = list(range(50))
    train, val = data.split_dataset(samples, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == samples and not set(train) & set(val)
    assert (train, val) == data.split_dataset(samples, 0.2, seed=3)
    assert val != data.split_dataset(samples, 0.2, seed=4)[1]
    assert len(data.split_dataset(samples, 0.001, seed=3)[1]) == 1  # at least one held out


def test_pack_lengths():
    # first-fit decreasing by hand: 5 | 4 | 3 -> bin 0 (5+3), 3 -> bin 1 (4+3), 2 | 2 -> bin 2, 1 -> bin 1 (4+3+1)
    assert data.pack_lengths([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    assert data.pack_lengths([8, 8], 8) == [[0], [1]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    for buffer_size in (1000, 64):
        bins = data.pack_lengths(lengths, 100, buffer_size=buffer_size)
        assert sorted(i for b in bins for i in b) == list(range(500))
        assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
        assert all(len({i // buffer_size for i in b}) == 1 for b in bins)  # bins never mix buffers
        assert len(bins) <= sum(lengths) / 100 * 1.25 + 1  # FFD packs tightly
    assert len(data.pack_lengths(lengths, 100)) < len(data.pack_lengths(lengths, 100, buffer_size=8))


@pytest.mark.parametrize("packing", [False, True])
def test_make_plan(packing):
    rng = random.Random(0)
    kept = [i for i in range(60) if i % 7]  # the indices of kept samples need not be contiguous
    lengths = [rng.randint(5, 40) for _ in kept]
    length_of = dict(zip(kept, lengths))
    plan = lambda seed=0, epoch=0, rank=0, world_size=1: data.make_plan(kept, lengths, 3, packing, 64, seed, epoch,
                                                                        rank, world_size)
    assert plan() == plan() and plan() != plan(epoch=1) and plan() != plan(seed=1)
    everything = [i for batch in plan() for i in batch]
    if packing:  # a batch is 3 bins joined; the last, short batch is kept
        assert sorted(everything) == kept
        assert all(sum(length_of[i] for i in batch) <= 3 * 64 for batch in plan())
    else:
        assert sorted(everything) == kept and all(len(batch) <= 3 for batch in plan())
    ranks = [plan(rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) > 0
    seen = [i for r in ranks for batch in r for i in batch]
    assert len(seen) == len(set(seen))  # disjoint across ranks
    with pytest.raises(ValueError, match="processes"):
        data.make_plan(kept[:2], lengths[:2], 3, packing, 64, 0, 0, 0, world_size=2)


def test_encoded_dataset_with_workers(encoder, media):
    samples = [s for s in mixed_samples(media)] * 2
    kept, lengths, errors, patches = data.measure_lengths(samples, encoder, num_workers=2)
    assert errors == [] and kept == list(range(len(samples)))
    assert patches == [data.flop_inputs([encoder.encode(s)])[1] for s in samples] and max(patches) > 0  # (auto's bound)
    plan = data.make_plan(kept, lengths, 1, True, 256, seed=0, epoch=0)
    dataset = data.EncodedDataset(samples, encoder, plan, packing=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    total = 0
    for bin_, batch in zip(plan, loader):
        assert batch["cu_seqlens"].tolist() == np.cumsum([0] + [lengths[kept.index(i)] for i in bin_]).tolist()
        assert batch["input_ids"].shape[1] <= 256 and batch["position_ids"].shape[:2] == (4, 1)
        total += len(bin_)
    assert total == len(samples)


# ----------------------------------------------------------------------------- 6. tiny checkpoints


def test_tiny_models_load_like_real_checkpoints(tiny_model_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tokenizer.chat_template
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] == tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
    config = AutoConfig.from_pretrained(tiny_model_path)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    model = load_model(tiny_model_path, "sdpa")
    assert model.config.model_type in ("qwen2_5_vl", "qwen3_vl")
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n" in text


def test_tiny_models_auto_processor(tiny_model_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_path)
    assert processor.image_processor.patch_size == data.Encoder(tiny_model_path).patch_size
    assert processor.tokenizer.chat_template or processor.chat_template
