"""
data.py: records -> samples -> encoded examples -> packed batches, media loading, tiny models and the demo task.

    json/jsonl record --load_dataset--> Sample     (one normal form for the four input formats)
    Sample --Encoder.encode--> Example             (input_ids, labels, position_ids[4, L], pixels)
    [Example] --collate--> Batch                   (one packed row [1, T] or right-padded rows [B, T])

Command line:
    python data.py check data.jsonl more.json      # validate datasets: every bad record with file:line, exit 1 if any
    python data.py demo --out demo_data            # write the demo task (SFT, CPT, DPO, RL files) and exit
"""
import argparse
import copy
import inspect
import io
import json
import math
import os
import random
import re
import reprlib
import struct
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.nn.attention.varlen import varlen_attn

IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
IGNORE = -100  # label value for tokens that carry no loss
SPECIAL_TOKEN_IN_TEXT = re.compile(r"<\|(?:im_start|im_end|vision_start|vision_end|image_pad|video_pad)\|>")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs; what is left is a broken escape

# ----------------------------------------------------------------------------------------------------------------
# Records -> samples


@dataclass
class Sample:
    """The normal form of every record. `messages` content is a string with <image>/<video> tags in place."""

    messages: list  # [{"role": "system"|"user"|"assistant", "content": str}], or [] for a pretraining text
    images: list = field(default_factory=list)  # resolved file paths, in tag order
    videos: list = field(default_factory=list)
    text: str | None = None  # pretraining (CPT) records: loss on every text token
    rejected: str | None = None  # DPO: the rejected final assistant reply
    extra: dict = field(default_factory=dict)  # RL: every other column (solution, ...), passed to rewards
    source: str = ""  # "file:line", for error messages


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file, the line, what is wrong and how to fix it."""


ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
              "bot": "assistant", "model": "assistant"}


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _media_item(value):
    """A media entry is a path string or {"path"|"image"|"video"|"url": path}."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("image") or value.get("video") or value.get("url")
    if not isinstance(value, str) or not value:  # reprlib: a short repr, even of a huge or deeply nested value
        raise BadRecord(f"media entry {reprlib.repr(value)} is not a path; give a file path string")
    return value


def _content_to_text(content, images, videos):
    """Typed-part content [{type: text|image|video}] -> a tagged string; media carried by parts are appended in order."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRecord(f"message content must be a string or a list of parts, got {type(content).__name__}")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text", ""), str):  # else `text +=` raises TypeError
                raise BadRecord(f"text part {reprlib.repr(part)} needs a string 'text'")
            text += part.get("text", "")
        elif kind in ("image", "image_url", "video"):
            tag, media = (VIDEO_TAG, videos) if kind == "video" else (IMAGE_TAG, images)
            ref = part.get("image") or part.get("video") or part.get("image_url") or part.get("path")
            if ref is not None:
                media.append(_media_item(ref["url"] if isinstance(ref, dict) and "url" in ref else ref))
            text += tag
        else:
            raise BadRecord(f"content part {reprlib.repr(part)} has no type text, image or video; give it a 'type'")
    return text


def _reply_text(value):
    """A DPO chosen/rejected reply: a string, one message, or a message list ending with the assistant reply."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    text = _content_to_text(value, [], []) if value is not None else None  # media in a reply: refused by the caller
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("the DPO reply is empty; give chosen and rejected replies as non-empty text")
    return text


def record_to_sample(record, stage):
    """One JSON record in any of the four formats -> Sample. `stage` is sft, pretrain, dpo or rl."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if stage == "auto":  # `data.py check` without --stage: pairs are DPO, texts pretraining, prompts RL, the rest SFT
        last = record["messages"][-1] if isinstance(record.get("messages"), list) and record["messages"] else None
        stage = ("dpo" if {"rejected_response", "rejected"} & record.keys() else "pretrain" if "text" in record
                 else "rl" if isinstance(last, dict) and last.get("role") == "user" else "sft")
    images = [_media_item(x) for x in _as_list(record.get("images", record.get("image")))]
    videos = [_media_item(x) for x in _as_list(record.get("videos", record.get("video")))]
    known = {"images", "image", "videos", "video"}
    messages, rejected, text = [], None, None
    if "messages" in record:  # messages format (also TRL-style chosen/rejected)
        known |= {"messages", "chosen", "rejected", "rejected_response"}
        if not isinstance(record["messages"], list):
            raise BadRecord("'messages' must be a list of {role, content}")
        for m in record["messages"]:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadRecord(f"message {reprlib.repr(m)} needs 'role' and 'content'")
            messages.append({"role": m["role"], "content": _content_to_text(m["content"], images, videos)})
    elif "conversations" in record:  # ShareGPT / Qwen official
        known |= {"conversations", "chosen", "rejected", "system"}
        if not isinstance(record["conversations"], list):
            raise BadRecord("'conversations' must be a list of {from, value}")
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"]})
        for m in record["conversations"]:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise BadRecord(f"conversation turn {reprlib.repr(m)} needs 'from' and 'value'")
            if not isinstance(m["from"], str) or m["from"] not in ROLE_NAMES:  # (a list is unhashable: TypeError)
                raise BadRecord(f"unknown speaker {reprlib.repr(m['from'])}; use human, gpt or system")
            messages.append({"role": ROLE_NAMES[m["from"]], "content": m["value"]})
    elif "query" in record or "response" in record:  # ms-swift
        known |= {"query", "response", "history", "system", "rejected_response"}
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"]})
        history = record.get("history") or []
        for turn in history if isinstance(history, list) else [None]:  # a number would raise TypeError (not iterable)
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise BadRecord("'history' must be a list of [query, response] pairs")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        messages.append({"role": "user", "content": record.get("query", "")})
        if record.get("response") is not None:
            messages.append({"role": "assistant", "content": record["response"]})
    elif "text" in record:  # pretraining
        known |= {"text"}
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(f"'text' must be a non-empty string, got {reprlib.repr(text)}; give the pretraining text")
    else:
        raise BadRecord("unknown format: expected one of the keys messages, conversations, query/response or text")
    for m in messages:
        if not isinstance(m["content"], str):
            raise BadRecord(f"message content must be text, got {reprlib.repr(m['content'])}")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRecord(f"unknown role {reprlib.repr(m['role'])}; use system, user or assistant")

    if stage == "dpo":
        if "rejected_response" in record:
            rejected = _reply_text(record["rejected_response"])
        elif "chosen" in record and "rejected" in record:
            chosen = _reply_text(record["chosen"])
            rejected = _reply_text(record["rejected"])
            if messages and messages[-1]["role"] == "assistant":
                messages.pop()
            messages.append({"role": "assistant", "content": chosen})
        else:
            raise BadRecord("a DPO record needs 'rejected_response', or 'chosen' and 'rejected'")
        # the rejected reply replaces the chosen one when encoded: a tag in either would give one side an image
        # the other lacks (and a pad count that matches no image)
        replies = [rejected] + [m["content"] for m in messages[-1:] if m["role"] == "assistant"]
        if any(tag in reply for reply in replies for tag in (IMAGE_TAG, VIDEO_TAG)):
            raise BadRecord("a DPO reply holds an <image> or <video> tag; put media in the prompt both replies share")
    if stage == "rl" and messages and messages[-1]["role"] == "assistant":
        messages.pop()  # an RL prompt ends with the user turn; a reference reply stays available as `solution`
    if text is None:
        _check_roles(messages, stage)
    # text that would forge the chat template or the vision pads (the encoder would crash or mislabel), and lone
    # surrogates from a broken \ud800 escape (the tokenizer and UTF-8 output refuse them), stop here with the line
    for value in [m["content"] for m in messages] + [text or "", rejected or ""] + images + videos:
        if found := SPECIAL_TOKEN_IN_TEXT.search(value):
            raise BadRecord(f"the text holds the special token {found.group()}, which only the chat template writes; "
                            f"remove it (write <image> or <video> for media)")
        if LONE_SURROGATE.search(value):
            raise BadRecord("the text holds a lone UTF-16 surrogate (a broken \\ud800-\\udfff escape); fix the text")
    _place_media_tags(messages, images, videos, text)
    extra = {k: v for k, v in record.items() if k not in known} if stage == "rl" else {}
    return Sample(messages=messages, images=images, videos=videos, text=text, rejected=rejected, extra=extra)


def _check_roles(messages, stage):
    turns = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord("a system message may only come first")
    if not turns:
        raise BadRecord("the record has no user turn")
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord(f"turn {i + 1} is {m['role']!r}, but turns must alternate user, assistant, user, ...")
    if stage in ("sft", "dpo"):
        if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
            raise BadRecord("the record has no assistant reply (or an empty one); end it with a non-empty reply")
    if stage == "rl" and turns[-1]["role"] != "user":
        raise BadRecord("an RL prompt must end with a user turn")


def _place_media_tags(messages, images, videos, text):
    """Tags must match the media; media with no tags at all go before the first user text."""
    for tag, media in ((IMAGE_TAG, images), (VIDEO_TAG, videos)):
        parts = [text] if text is not None else [m["content"] for m in messages]
        count = sum(p.count(tag) for p in parts)
        if count == 0 and media and text is None:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = tag * len(media) + first_user["content"]
        elif count != len(media):
            raise BadRecord(f"{count} {tag} tag(s) but {len(media)} {tag[1:-1]}(s) given; "
                            f"write one {tag} per {tag[1:-1]}, or none to place them before the first user text")


def _read_records(path):
    """Yield (line_number, record or exception) from a JSONL file or a JSON array (line of each element's start)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadRecord(f"{path}: cannot read the dataset file ({e.strerror})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
    # json raises JSONDecodeError for syntax, ValueError for numbers over 4300 digits, RecursionError for deep nesting
    invalid = lambda e: f"invalid JSON ({getattr(e, 'msg', e)}{f' at column {e.colno}' if hasattr(e, 'colno') else ''})"
    if raw.lstrip().startswith(b"[") and not path.lower().endswith(".jsonl"):  # JSON array: element by element, for lines
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise BadRecord(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
        decoder, pos, line, counted = json.JSONDecoder(), content.index("[") + 1, 1, 0
        while True:
            while pos < len(content) and content[pos] in " \t\r\n,":
                pos += 1
            line, counted = line + content.count("\n", counted, pos), pos  # counted as we go: linear in the file size
            if pos >= len(content) or content[pos] == "]":
                if content[pos + 1 :].strip():  # JSON Lines whose first record is a list: say so, never drop the rest
                    yield line, BadRecord("text after the JSON array's closing ']'; a .json file holds one array "
                                          "(name a JSON Lines file .jsonl)")
                return
            try:
                record, pos = decoder.raw_decode(content, pos)
            except (ValueError, RecursionError) as e:
                yield line, BadRecord(invalid(e) + "; fix the syntax")
                return  # the rest of an array cannot be located after a syntax error
            yield line, record
    # JSONL: split on b"\n" only (str.splitlines would also split inside strings at U+2028, U+0085, ...)
    for line, row in enumerate(raw.split(b"\n"), 1):
        if row.strip():
            try:
                yield line, json.loads(row.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield line, BadRecord(f"not UTF-8 text (byte {e.start} of the line); re-save the file as UTF-8")
            except (ValueError, RecursionError) as e:
                yield line, BadRecord(invalid(e) + "; fix the syntax or remove the line")


def resolve_media(path, data_file, media_root):
    if path.startswith(("http://", "https://")):
        raise BadRecord(f"{path} is a URL; download the file and give its local path")
    candidates = [path] if os.path.isabs(path) else [os.path.join(media_root, path)] if media_root else []
    if not os.path.isabs(path):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(data_file)), path))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise BadRecord(f"media file {path} not found (looked in {', '.join(candidates)}); fix the path or set --media_root")


def check_media(path, video=False):
    """Decode a media file as training will (a video's frames sampled as by default); raise BadRecord if it fails.
    Whether it is a video comes from the record, not the file name: a picture given as a video fails here too."""
    if os.path.getsize(path) == 0:
        raise BadRecord(f"media file {path} is empty (0 bytes); replace the file")
    if video:  # all frames training reads: a file whose header opens can still be cut short
        v = VisionConfig()
        read_video(path, v.fps, v.video_min_frames, v.video_max_frames)
    else:
        load_image(path)


def load_file(path, stage, media_root=None, skip_bad_records=False, check_media_files=False):
    """Read one dataset file -> (samples, errors). Raise on the first bad record unless skip_bad_records."""
    samples, errors = [], []
    try:
        for line, record in _read_records(path):
            try:
                if isinstance(record, Exception):
                    raise record
                sample = record_to_sample(record, stage)
                sample.images = [resolve_media(p, path, media_root) for p in sample.images]
                sample.videos = [resolve_media(p, path, media_root) for p in sample.videos]
                if check_media_files:
                    for p in sample.images + sample.videos:
                        check_media(p, video=p in sample.videos)
                sample.source = f"{path}:{line}"
                samples.append(sample)
            except BadRecord as e:
                error = f"{path}:{line}: {e}".replace("\n", "\\n").replace("\r", "\\r")  # one line per record
                if not skip_bad_records:
                    raise BadRecord(error + " (or pass --skip_bad_records)") from None
                errors.append(error)
    except BadRecord as e:
        if skip_bad_records and str(e).startswith(path):  # the whole file is unreadable
            errors.append(str(e))
        else:
            raise
    return samples, errors


def is_demo(spec):
    return isinstance(spec, str) and re.split(r"[%#]", spec)[0] == "demo"


def load_dataset(specs, stage, seed=0, media_root=None, skip_bad_records=False, split="train"):
    """`a.jsonl b.json%50 c.jsonl#2000`: a whole file, a percentage or a count of it, sampled with the seed.
    `demo`, `demo#N`, `demo%P` name the demo task's file for the stage and split."""
    samples = []
    for spec in specs:
        if is_demo(spec):
            spec = demo_path({"pretrain": "cpt"}.get(stage, stage), split) + spec[len("demo"):]
        match = isinstance(spec, str) and re.fullmatch(r"(.+?)(?:([%#])(\d+(?:\.\d+)?))?", spec)
        if not match:  # "" (e.g. `--dataset ""`) matched nothing, and .groups() raised AttributeError
            raise BadRecord(f"empty dataset spec {spec!r}; give a file: data.jsonl, data.jsonl%50 or data.jsonl#1000")
        path, kind, amount = match.groups()
        file_samples, errors = load_file(path, stage, media_root, skip_bad_records)
        if errors:
            print(f"skipped {len(errors)} bad record(s) in {path}; first: {errors[0]}", file=sys.stderr)
        if kind:
            n = round(len(file_samples) * float(amount) / 100) if kind == "%" else int(float(amount))
            rng = random.Random(seed)
            # a count above the file's size repeats records (upsampling), as ms-swift does
            order = [i for _ in range(n // max(len(file_samples), 1) + 1) for i in rng.sample(range(len(file_samples)), len(file_samples))]
            file_samples = [file_samples[i] for i in order[:n]]
        samples += file_samples
    if not samples:
        raise BadRecord(f"no usable records in {' '.join(specs)}")
    return samples


def load_train_val(dataset, val_dataset, split_dataset_ratio, stage, seed, media_root=None, skip_bad_records=False):
    """--dataset, --val_dataset, --split_dataset_ratio -> (training samples, validation samples). The demo's held-out
    split (`demo`, every script's default --val_dataset) is used only when training on the demo."""
    train = load_dataset(dataset, stage, seed, media_root, skip_bad_records)
    if split_dataset_ratio > 0:
        return split_dataset(train, split_dataset_ratio, seed)
    if not val_dataset or all(map(is_demo, val_dataset)) and not all(map(is_demo, dataset)):
        return train, []
    return train, load_dataset(val_dataset, stage, seed, media_root, skip_bad_records, split="val")


def split_dataset(samples, ratio, seed):
    """Hold out `ratio` of the samples (at least one) for validation, chosen with the seed."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(samples) * ratio))
    return [samples[i] for i in sorted(order[n_val:])], [samples[i] for i in sorted(order[:n_val])]


# ----------------------------------------------------------------------------------------------------------------
# Media


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """Qwen-VL's resize rule, exactly as transformers' smart_resize: sides divisible by `factor` (patch * merge),
    area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise BadRecord(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is above 200:1; crop the image")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # a side of 0 is raised to min_pixels below
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(path):
    """-> RGB image. The size is judged from the header, before any pixel is decoded: PIL refuses an image above
    twice Image.MAX_IMAGE_PIXELS (a decompression bomb: a small file declaring billions of pixels) but only warns
    above once that, so the warning is an error here. `path` may also be a PIL image already in memory (what a
    multi-turn tool returns, train_grpo.py's --multi_turn_plugin): a copy of it in RGB."""
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if max(w, h) > 200 * min(w, h):  # smart_resize would refuse it after decoding
                    raise BadRecord(f"image {path} is {w}x{h} pixels: a side of 0 or aspect ratio above 200:1; crop it")
                return img.convert("RGB")
    except BadRecord:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecord(f"image {path} is too large to decode ({e}); downscale it") from None
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e)[:100]}"
        raise BadRecord(f"image {path} is corrupt or not an image ({reason}); replace the file") from None


def read_video(path, fps, min_frames, max_frames, frame_factor=2):
    """Sample frames at `fps` with decord -> (uint8 array [T, H, W, 3], frame indices, the video's own fps)."""
    import decord

    try:  # decord raises its own errors both for files it cannot open and for frames it cannot decode
        reader = decord.VideoReader(path)
        total, video_fps = len(reader), reader.get_avg_fps() or 24.0
        n = total / video_fps * fps
        n = min(max(n, min_frames), max_frames, total)
        n = max(frame_factor, int(n // frame_factor) * frame_factor)
        indices = np.linspace(0, total - 1, n).round().astype(int)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as e:
        reason = re.sub(r"\[\d\d:\d\d:\d\d\] \S+ ", "", (str(e).splitlines() or [""])[0])  # less decord's time, source
        raise BadRecord(f"video {path} cannot be read ({reason[:160]}); re-encode it as mp4") from None
    return frames, indices, video_fps


def patchify(frames, patch_size, temporal_patch_size, merge_size):
    """[T, C, H, W] normalised frames -> Qwen-VL patches [grid_t*grid_h*grid_w, C*tp*ps*ps] and grid (t, h, w).
    Patches are ordered so that each merge_size x merge_size window is contiguous, as the vision merger expects."""
    if frames.shape[0] % temporal_patch_size:
        pad = temporal_patch_size - frames.shape[0] % temporal_patch_size
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ----------------------------------------------------------------------------------------------------------------
# Samples -> examples


@dataclass
class VisionConfig:
    min_pixels: int | None = None  # None: the processor's own bounds (or MIN_PIXELS / MAX_PIXELS from the environment)
    max_pixels: int | None = None
    fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_max_pixels: int = 128 * 28 * 28


class Encoder:
    """Turns Samples into Examples with the model's own tokenizer, chat template and image processor.

    An Example is a dict of tensors for one sequence of L tokens:
      input_ids [L]; labels [L], already shifted: labels[t] is the token predicted at position t, or IGNORE;
      position_ids [4, L] (text positions, then the 3 multimodal rope rows from the model's get_rope_index);
      pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw when the sample has media.
    """

    def __init__(self, model_path, vision=VisionConfig(), max_length=2048, truncation_strategy="error",
                 trust_remote_code=False):
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        # the PIL image processor: the default (fast) one imports torchvision, which CPU-only machines lack
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        self.config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.trust_remote_code = trust_remote_code
        self.model_type = self.config.model_type
        self.max_length, self.truncation_strategy = max_length, truncation_strategy
        env = lambda name: int(os.environ[name]) if os.environ.get(name) else None
        size = self.image_processor.size
        self.min_pixels = vision.min_pixels or env("MIN_PIXELS") or size.shortest_edge
        self.max_pixels = vision.max_pixels or env("MAX_PIXELS") or size.longest_edge
        self.vision = vision
        ip = self.image_processor
        self.patch_size, self.merge_size, self.temporal_patch_size = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        self.mean, self.std = np.array(ip.image_mean, np.float32), np.array(ip.image_std, np.float32)
        token = self.tokenizer.convert_tokens_to_ids
        self.image_pad, self.video_pad = token("<|image_pad|>"), token("<|video_pad|>")
        self.im_start, self.im_end = token("<|im_start|>"), token("<|im_end|>")
        self.assistant_header = self.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._rope_model = None

    # --- vision
    def image_size(self, image):
        """(height, width) that an image is resized to: smart_resize for the encoder's pixel bounds."""
        return smart_resize(image.height, image.width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def video_frames(self, path):
        """A video's frames as the model sees them: sampled (--fps and the frame bounds) and resized.
        -> (frames [N, H, W, 3] uint8, their indices in the file, the file's fps)"""
        v = self.vision
        frames, indices, video_fps = read_video(path, v.fps, v.video_min_frames, v.video_max_frames, self.temporal_patch_size)
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(frames.shape[1], frames.shape[2], factor, min(self.min_pixels, v.video_max_pixels), v.video_max_pixels)
        return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames]), indices, video_fps

    def encode_image(self, path):
        image = load_image(path)
        h, w = self.image_size(image)
        out = self.image_processor(images=[image], min_pixels=self.min_pixels, max_pixels=self.max_pixels, return_tensors="pt")
        assert tuple(out["image_grid_thw"][0].tolist()) == (1, h // self.patch_size, w // self.patch_size)
        return out["pixel_values"], out["image_grid_thw"]

    def encode_video(self, path):
        resized, indices, video_fps = self.video_frames(path)
        normalised = ((resized.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(0, 3, 1, 2)
        patches, grid = patchify(normalised, self.patch_size, self.temporal_patch_size, self.merge_size)
        # seconds covered by one temporal patch; Qwen3-VL writes a timestamp per temporal patch into the prompt
        pair_times = [(indices[i] + indices[min(i + self.temporal_patch_size - 1, len(indices) - 1)]) / 2 / video_fps
                      for i in range(0, len(indices), self.temporal_patch_size)]
        seconds_per_patch = self.temporal_patch_size * (indices[-1] - indices[0] + 1) / len(indices) / video_fps
        return torch.from_numpy(patches), torch.tensor([grid]), seconds_per_patch, pair_times

    # --- text
    def render(self, sample, add_generation_prompt=False, reply=None):
        """Chat template text with one <|vision_start|><|image_pad|><|vision_end|> per image (pads expanded later)."""
        if sample.text is not None:
            # a pretraining document ends with <|endoftext|>, so packed documents learn where each one stops
            return sample.text.replace(IMAGE_TAG, "<|vision_start|><|image_pad|><|vision_end|>").replace(
                VIDEO_TAG, "<|vision_start|><|video_pad|><|vision_end|>") + "<|endoftext|>"
        messages = [dict(m) for m in sample.messages]
        if reply is not None:
            messages[-1] = {"role": "assistant", "content": reply}
        conversation = []
        for m in messages:
            parts = []
            for piece in re.split(f"({IMAGE_TAG}|{VIDEO_TAG})", m["content"]):
                if piece == IMAGE_TAG:
                    parts.append({"type": "image"})
                elif piece == VIDEO_TAG:
                    parts.append({"type": "video"})
                elif piece:
                    parts.append({"type": "text", "text": piece})
            conversation.append({"role": m["role"], "content": parts})
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, sample, train_on="assistant", add_generation_prompt=False, reply=None):
        """Sample -> Example. train_on: 'assistant' (every assistant turn), 'all' (every text token), 'none' (prompts)."""
        text = self.render(sample, add_generation_prompt, reply)
        example = {}
        image_tokens, video_tokens = [], []
        if sample.images:
            pixels, grids = zip(*[self.encode_image(p) for p in sample.images])
            example["pixel_values"], example["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
            image_tokens = [int(g.prod()) // self.merge_size**2 for g in example["image_grid_thw"]]
        if sample.videos:
            videos = [self.encode_video(p) for p in sample.videos]
            example["pixel_values_videos"] = torch.cat([v[0] for v in videos])
            example["video_grid_thw"] = torch.cat([v[1] for v in videos])
            example["second_per_grid_ts"] = torch.tensor([v[2] for v in videos])
            video_tokens = videos
        text = self._expand_vision(text, image_tokens, video_tokens)
        input_ids = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False))
        if sample.text is not None or train_on == "all":
            labels = input_ids.clone()
        elif train_on == "assistant":
            labels = self._assistant_labels(input_ids)
        else:
            labels = torch.full_like(input_ids, IGNORE)
        labels[(input_ids == self.image_pad) | (input_ids == self.video_pad)] = IGNORE
        example["input_ids"] = input_ids
        example["labels"] = torch.cat([labels[1:], torch.tensor([IGNORE])])  # shifted: the target of position t
        return self._truncate(example, sample)

    def _expand_vision(self, text, image_tokens, videos):
        pieces = re.split(r"(<\|image_pad\|>|<\|vision_start\|><\|video_pad\|><\|vision_end\|>)", text)
        out, images, vids = [], iter(image_tokens), iter(videos)
        for piece in pieces:
            if piece == "<|image_pad|>":
                out.append("<|image_pad|>" * next(images))
            elif piece.startswith("<|vision_start|><|video_pad|>"):
                _, grid, _, pair_times = next(vids)
                t, h, w = grid[0].tolist()
                per_frame = h * w // self.merge_size**2
                if self.model_type == "qwen3_vl":  # a timestamp before each temporal patch, as Qwen3-VL's processor writes
                    out.append("".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
                                       for s in pair_times))
                else:
                    out.append("<|vision_start|>" + "<|video_pad|>" * (t * per_frame) + "<|vision_end|>")
            else:
                out.append(piece)
        return "".join(out)

    def _assistant_labels(self, input_ids):
        """Label the tokens of every assistant reply, its <|im_end|> included, found by the ChatML header."""
        labels = torch.full_like(input_ids, IGNORE)
        ids, header = input_ids.tolist(), self.assistant_header
        i = 0
        while i < len(ids):
            if ids[i : i + len(header)] == header:
                start = i + len(header)
                end = start
                while end < len(ids) and ids[end] != self.im_end:
                    end += 1
                labels[start : end + 1] = input_ids[start : end + 1]
                i = end + 1
            else:
                i += 1
        return labels

    def _truncate(self, example, sample):
        n = len(example["input_ids"])
        if n <= self.max_length:
            return example
        strategy = self.truncation_strategy
        if strategy == "delete":
            return None
        if strategy == "error":
            raise BadRecord(f"{sample.source}: {n} tokens, above --max_length {self.max_length}; raise --max_length, lower "
                            f"--max_pixels, or choose --truncation_strategy left|right|delete")
        keep = slice(0, self.max_length) if strategy == "right" else slice(n - self.max_length, n)
        is_vision = (example["input_ids"] == self.image_pad) | (example["input_ids"] == self.video_pad)
        if is_vision.sum() != is_vision[keep].sum():
            raise BadRecord(f"{sample.source}: truncating to {self.max_length} tokens would cut an image or video; "
                            f"raise --max_length or lower --max_pixels")
        example["input_ids"], example["labels"] = example["input_ids"][keep], example["labels"][keep].clone()
        example["labels"][-1] = IGNORE
        return example

    def add_positions(self, example):
        """position_ids [4, L]: text positions, then the model's own multimodal rope positions."""
        if self._rope_model is None:
            from transformers import AutoModel

            with torch.device("meta"):  # no weights: only get_rope_index is used, which needs the config alone
                self._rope_model = AutoModel.from_config(self.config, trust_remote_code=self.trust_remote_code)
        ids = example["input_ids"]
        mm_types = (ids == self.image_pad).int() + 2 * (ids == self.video_pad).int()
        kwargs = {"video_grid_thw": example.get("video_grid_thw"), "image_grid_thw": example.get("image_grid_thw")}
        if self.model_type != "qwen3_vl":
            kwargs["second_per_grid_ts"] = example.get("second_per_grid_ts")
        rope, _ = self._rope_model.get_rope_index(ids[None], mm_types[None], **kwargs)
        example["position_ids"] = torch.cat([torch.arange(len(ids))[None], rope[:, 0]])
        return example

    def __call__(self, sample, **kwargs):
        example = self.encode(sample, **kwargs)
        return None if example is None else self.add_positions(example)


# ----------------------------------------------------------------------------------------------------------------
# Examples -> batches

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def pack_lengths(lengths, max_length, buffer_size=1000):
    """First-fit decreasing, buffer by buffer (in the given order): -> bins of indices, each summing <= max_length."""
    bins = []
    for start in range(0, len(lengths), buffer_size):
        chunk = sorted(range(start, min(start + buffer_size, len(lengths))), key=lambda i: -lengths[i])
        chunk_bins, space = [], []
        for i in chunk:
            for b, free in enumerate(space):
                if lengths[i] <= free:
                    chunk_bins[b].append(i)
                    space[b] -= lengths[i]
                    break
            else:
                chunk_bins.append([i])
                space.append(max_length - lengths[i])
        bins += chunk_bins
    return bins


def collate(examples, packing, pad_token_id=0):
    """Examples -> one batch dict. Packed: one row [1, T], every example keeping its own positions, with cu_seqlens
    marking where each starts (attention never crosses them). Not packed: right-padded rows [B, T] + attention_mask.
    On a packed row transformers builds the block-diagonal mask from the text positions (position_ids[0]) only when
    attention_mask is None and there is no KV cache: call the model with use_cache=False, or examples see each other."""
    lengths = [len(e["input_ids"]) for e in examples]
    batch = {}
    if packing:
        batch["input_ids"] = torch.cat([e["input_ids"] for e in examples])[None]
        batch["labels"] = torch.cat([e["labels"] for e in examples])[None]
        batch["position_ids"] = torch.cat([e["position_ids"] for e in examples], dim=1)[:, None]
        batch["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0).int()
        batch["attention_mask"] = None
        # for varlen_attention (GPU): where each example starts, and the longest, known here without a GPU sync
        batch["packed_cu_seqlens"], batch["packed_max_seqlen"] = batch["cu_seqlens"], max(lengths)
    else:
        T = max(lengths)
        pad = lambda x, value: torch.nn.functional.pad(x, (0, T - x.shape[-1]), value=value)
        batch["input_ids"] = torch.stack([pad(e["input_ids"], pad_token_id) for e in examples])
        batch["labels"] = torch.stack([pad(e["labels"], IGNORE) for e in examples])
        batch["position_ids"] = torch.stack([pad(e["position_ids"], 1) for e in examples], dim=1)
        batch["attention_mask"] = torch.stack([pad(torch.ones(n, dtype=torch.long), 0) for n in lengths])
        batch["cu_seqlens"] = None
    for key in VISION_KEYS:
        parts = [e[key] for e in examples if key in e]
        batch[key] = torch.cat(parts) if parts else None
    return batch


def collate_shared(examples, heads):
    """collate(examples, packing=True) with a prompt that several examples share in the row once: example i with
    heads[i] = j != i (j's prompt is i's: DPO's rejected reply and its chosen one, GRPO's completions of one prompt)
    keeps only its tokens from the prompt's last one on (whose output predicts its reply's first token), and attends
    to example j's prompt, then to itself (varlen_attention's packed_key_index). cu_seqlens still marks one sequence
    per example, in order; the log-probabilities are collate's, with each shared prompt and its images through the
    model once. An example whose prompt tokens differ from its head's (truncated apart) stays whole."""
    labelled = [e["labels"] != IGNORE for e in examples]
    firsts = [int(mask.nonzero()[0]) if mask.any() else 0 for mask in labelled]  # where each reply starts
    rows, shared = [], []
    for i, (e, j, t) in enumerate(zip(examples, heads, firsts)):
        same = (j != i and heads[j] == j and t > 0 and t == firsts[j]
                and torch.equal(examples[j]["input_ids"][: t + 1], e["input_ids"][: t + 1]))
        tail = {key: e[key][t:] for key in ("input_ids", "labels")} | {"position_ids": e["position_ids"][:, t:]}
        rows.append(tail if same else e)
        shared.append(t if same else 0)
    batch = collate(rows, packing=True)
    if not any(shared):  # nothing shared: every sequence's keys are its own, with no gather
        return batch
    bounds = batch["cu_seqlens"].tolist()
    keys = [torch.cat([torch.arange(bounds[j], bounds[j] + n), torch.arange(a, b)])
            for j, n, a, b in zip(heads, shared, bounds, bounds[1:])]
    lengths = [len(k) for k in keys]
    batch["packed_key_index"] = torch.cat(keys)
    batch["packed_cu_seqlens_k"] = torch.tensor([0] + lengths).cumsum(0).int()
    batch["packed_max_seqlen_k"] = max(lengths)
    return batch


def shared_prompt_attention_error(device, prompt=7, chosen=5, rejected=4):
    """varlen_attention on collate_shared's layout of one DPO pair (random queries, keys and values; 8 query heads, 2
    key/value heads) against each of its sequences alone through SDPA -> the largest difference (bf16 on a GPU: ~1e-2;
    a kernel whose causal mask is aligned top-left: ~1)."""
    module, g = torch.nn.Module(), torch.Generator().manual_seed(0)
    module.is_causal = True
    first, dtype = prompt + chosen, torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, first + rejected, 64, generator=g) for heads in (8, 2, 2))
    # the row: prompt + chosen, then the prompt's last token and the rejected reply
    row = lambda x: torch.cat([x[:, :, :first], x[:, :, prompt - 1 : prompt], x[:, :, first:]], 2).to(device, dtype)
    keys = torch.cat([torch.arange(first), torch.arange(prompt - 1), torch.arange(first, first + 1 + rejected)])
    lengths = torch.tensor([[0, first, first + 1 + rejected], [0, first, first + prompt + rejected]], dtype=torch.int32)
    out = varlen_attention(module, row(q), row(k), row(v), None, scaling=0.125, packed_cu_seqlens=lengths[0].to(device),
                           packed_max_seqlen=first, packed_key_index=keys.to(device),
                           packed_cu_seqlens_k=lengths[1].to(device), packed_max_seqlen_k=first)[0][0].float().cpu()
    alone = lambda *x: torch.nn.functional.scaled_dot_product_attention(
        x[0], *(y.repeat_interleave(4, dim=1) for y in x[1:]), is_causal=True, scale=0.125)[0].transpose(0, 1)
    apart = lambda x: torch.cat([x[:, :, :prompt], x[:, :, first:]], 2)  # the rejected example alone
    expected = torch.cat([alone(q[:, :, :first], k[:, :, :first], v[:, :, :first]),
                          alone(apart(q), apart(k), apart(v))[prompt - 1 :]])
    return (out - expected).abs().max().item()


def check_shared_prompt_attention(device):
    """Before training with collate_shared's rows on a GPU: stop, naming the way out, if this torch's flash kernel
    does not align a causal mask with the last key, as a sequence attending to a shared prompt needs."""
    if device.type == "cuda" and shared_prompt_attention_error(device) > 2e-2:
        raise SystemExit("this torch's variable-length flash kernel does not align a causal mask with the last key, "
                         "which packing a shared prompt once needs: run with --attn_implementation sdpa")


# model keyword arguments of a packed batch (the key ones: collate_shared)
PACKED_KEYS = ("packed_cu_seqlens", "packed_max_seqlen", "packed_key_index", "packed_cu_seqlens_k",
               "packed_max_seqlen_k")
WINDOW_KEYS = ("window_index", "cu_window_seqlens", "max_window_seqlen", "max_seqlen")  # see vision_windows


def vision_windows(batch, config):
    """Qwen2.5-VL's vision tower reorders patches by attention window. transformers takes that order from these model
    keyword arguments when given, else builds it inside every forward on the CPU from the GPU's grid_thw and indexes
    GPU tensors with CPU indices (forward and backward): about a dozen waits for the GPU a step. Built here, in a
    DataLoader worker, they reach the GPU with the batch. -> {} where they do not apply: other models, text only, or
    images and videos in one batch (the tower runs once for each, with the same keyword arguments)."""
    from transformers.vision_utils import get_vision_window_index

    grids = [batch[k] for k in ("image_grid_thw", "video_grid_thw") if batch.get(k) is not None]
    if len(grids) != 1 or config.model_type != "qwen2_5_vl":
        return {}
    vision = config.vision_config
    window_index, cu_window_seqlens = get_vision_window_index(grids[0], vision.spatial_merge_size, vision.window_size,
                                                              vision.patch_size)
    return {"window_index": window_index, "cu_window_seqlens": cu_window_seqlens,
            "max_window_seqlen": int(cu_window_seqlens.diff().max()),
            "max_seqlen": int((grids[0][:, 1] * grids[0][:, 2]).max())}  # full attention: one frame of one image


# ----------------------------------------------------------------------------------------------------------------
# Attention over packed rows on GPU: one variable-length flash kernel call per layer instead of a [T, T] mask, and
# one call per vision block instead of one per image window.

VARLEN_ATTENTION = "varlen_flash"  # "flash" in the name: Qwen's vision blocks then hand over their cu_seqlens


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None).
    Sequence boundaries come from the vision blocks (cu_seq_lens_q: images and windows, not causal) or from a packed
    training batch (packed_cu_seqlens, causal; with packed_key_index a sequence's keys are those positions, its own
    last, as collate_shared lays them out: causal then aligns a query with the last of its keys). Generation's new
    token attends with its query heads grouped per key/value head. Anything else (a prompt into a KV cache, padded
    rows) is SDPA with the mask transformers built.
    On CPU the same boundaries go through SDPA one sequence at a time, for tests.
    With --compile the GPU path is traced into the layer's graph (torch's kernel is a custom op, and the boundaries
    are tensors and dynamic ints, so a new batch does not recompile); a graph break here split every layer in two
    graphs and an eager call, and 3B image rows ran at 8.6k tokens/s instead of 11.1k on an H100."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, new_tokens, head_dim = query.shape
    if new_tokens == 1 and key.shape[1] < heads:  # generation's one new token under grouped-query attention
        # each key/value head's group of query heads attends as that many queries of one sequence: the same sums
        # without SDPA's fallback for a masked GQA call, which copies every cached key and value head per query head
        out = torch.nn.functional.scaled_dot_product_attention(
            query.view(batch, key.shape[1], heads // key.shape[1], head_dim), key, value,
            attn_mask=None if attention_mask is None else attention_mask[..., : key.shape[2]], scale=scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2), None
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    key_index = None
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = kwargs.get("packed_cu_seqlens"), kwargs.get("packed_max_seqlen")
        key_index = kwargs.get("packed_key_index")
    cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    if key_index is not None:
        cu_seqlens_k, max_seqlen_k = kwargs["packed_cu_seqlens_k"], kwargs["packed_max_seqlen_k"]
    # one sequence in the row (its length is known from the shape, no sync): SDPA's causal kernel is the faster one
    if cu_seqlens is None or len(cu_seqlens) == 2 or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    causal = getattr(module, "is_causal", True)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    if key_index is not None:  # a shared prompt's keys and values, again for each sequence that shares it
        key_index = key_index.to(k.device)
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: as many key/value heads as query heads
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if not q.is_cuda:
        return _sdpa_per_sequence(q, k, v, cu_seqlens, cu_seqlens_k, causal, scaling)[None], None
    extra = {"is_causal": causal} if "is_causal" in _VARLEN_OPTIONS else {"window_size": (-1, 0) if causal else (-1, -1)}
    if "scale" in _VARLEN_OPTIONS:
        extra["scale"] = scaling
    # max_seqlen stays a Python int (a symbolic one when compiled): int() on it would fix its value in the graph
    # (the flash kernel aligns causal masks bottom-right: a query with the last of its keys, as collate_shared needs)
    cu_seqlens, cu_seqlens_k = cu_seqlens.to(q.device, torch.int32), cu_seqlens_k.to(q.device, torch.int32)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **extra)
    return out[None], None


@torch.compiler.disable  # the boundaries are read on the host
def _sdpa_per_sequence(q, k, v, cu_seqlens, cu_seqlens_k, causal, scaling):
    bounds, key_bounds, out = cu_seqlens.tolist(), cu_seqlens_k.tolist(), []
    for a, b, c, d in zip(bounds, bounds[1:], key_bounds, key_bounds[1:]):
        # causal with more keys than queries: each query sees the keys up to its own, the last ones (bottom-right)
        mask = None
        if causal and d - c != b - a:
            mask = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).tril(d - c - (b - a))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1), attn_mask=mask,
            is_causal=causal and mask is None, scale=scaling).transpose(0, 1))
    return torch.cat(out)


# torch's variable-length flash kernel takes is_causal in torch 2.10, window_size in later versions (the check can
# go once requirements.txt asks for a torch whose varlen_attn always takes window_size)
_VARLEN_OPTIONS = frozenset(inspect.signature(varlen_attn).parameters)


def use_varlen_attention(model):
    """Switch a loaded Qwen-VL model (language model and vision tower) to varlen_attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(**kwargs):  # no padding: no mask (varlen_attention or SDPA's is_causal); padding: SDPA's mask
        return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, mask)
    model.config._attn_implementation = VARLEN_ATTENTION  # set on the text and vision configs too
    return model


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i is a list of encoded examples (one bin of a packing plan, or one batch).
    Encoding happens in DataLoader workers, so images are decoded off the training process."""

    def __init__(self, samples, encoder, plan, packing, encode_kwargs=None):
        self.samples, self.encoder, self.plan, self.packing = samples, encoder, plan, packing
        self.encode_kwargs = encode_kwargs or {}

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        examples = [self.encoder(self.samples[j], **self.encode_kwargs) for j in self.plan[i]]
        batch = collate(examples, self.packing, self.encoder.tokenizer.pad_token_id or 0)
        return batch | vision_windows(batch, self.encoder.config)


def measure_lengths(samples, encoder, skip_bad_records=False, num_workers=0, encode_kwargs=None, rank=0, world_size=1):
    """Encode every sample once to learn its token count (and find bad records before training starts), each of
    world_size processes taking every world_size-th sample and all of them gathering the results.
    -> (kept sample indices, their lengths, this process's errors, their vision patches). Over-long samples under
    --truncation_strategy delete are dropped."""
    shard = list(range(rank, len(samples), world_size))

    class Lengths(torch.utils.data.Dataset):
        def __len__(self):
            return len(shard)

        def __getitem__(self, k):
            i = shard[k]
            try:
                example = encoder.encode(samples[i], **(encode_kwargs or {}))
                if example is None:
                    return i, None, None, None
                patches = sum(len(example[k]) for k in ("pixel_values", "pixel_values_videos") if k in example)
                return i, len(example["input_ids"]), patches, None
            except BadRecord as e:
                return i, None, None, str(e) if str(e).startswith(samples[i].source) else f"{samples[i].source}: {e}"

    loader = torch.utils.data.DataLoader(Lengths(), batch_size=None, num_workers=num_workers)
    kept, lengths, patches, errors, deleted = [], [], [], [], 0
    for i, n, p, error in loader:
        if error:
            if not skip_bad_records:
                raise BadRecord(error + " (or pass --skip_bad_records)")
            errors.append(error)
        elif n is None:
            deleted += 1
        else:
            kept.append(i)
            lengths.append(n)
            patches.append(p)
    if deleted:
        print(f"dropped {deleted} example(s) longer than --max_length (--truncation_strategy delete)", file=sys.stderr)
    if errors:
        print(f"skipped {len(errors)} bad record(s) (--skip_bad_records); first: {errors[0]}", file=sys.stderr)
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, (kept, lengths, patches))
        rows = sorted(row for part in parts for row in zip(*part))
        kept, lengths, patches = [i for i, _, _ in rows], [n for _, n, _ in rows], [p for _, _, p in rows]
    return kept, lengths, errors, patches


def make_plan(kept, lengths, batch_size, packing, max_length, seed, epoch, rank=0, world_size=1):
    """The order of one epoch for one rank: a list of micro-batches, each a list of sample indices.
    Shuffled with (seed, epoch), so a resumed run sees the same order; every rank gets the same number of batches."""
    order = list(range(len(kept)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    if packing:
        bins = pack_lengths([lengths[i] for i in order], max_length)
        bins = [[kept[order[j]] for j in b] for b in bins]
        random.Random(seed * 1000 + epoch + 1).shuffle(bins)
        # a packed micro-batch is `batch_size` bins joined into one row
        batches = [sum(bins[i : i + batch_size], []) for i in range(0, len(bins), batch_size)]
    else:
        batches = [[kept[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batch(es) for {world_size} processes; use more data or a smaller batch")
    # interleaved: global batch k is micro-batch k of every rank, the same examples a single process would take together
    return batches[rank : per_rank * world_size : world_size]


# ----------------------------------------------------------------------------------------------------------------
# Speed: the useful FLOPs of a step (MFU in the train scripts' logs and bench.py), and the activation memory that
# decides how many layers recompute under --gradient_checkpointing auto

PEAK_FLOPS = 989e12  # bf16 dense, H100 / H200 SXM


def parameter_counts(config):
    """(language-model parameters less the input embeddings, output-head parameters, vision parameters) of a model of
    this config, built on the meta device (nothing allocated). The input embeddings are a lookup, not a matmul, but
    the output head (tied or not) is one of the same size: it takes their place in the count."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):  # (sdpa: a training model's config names the scripts' own attention, unknown here)
        # (a copy: from_config sets the attention on the config it is given, which is the training model's)
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    head = model.model.language_model.embed_tokens.weight.numel()
    body = sum(p.numel() for p in model.model.language_model.parameters()) - head
    return body, head, sum(p.numel() for p in model.model.visual.parameters())


def training_flops(config, lengths, patches, labelled=None, counts=None):
    """Useful FLOPs of one forward and backward over sequences of `lengths` tokens holding `patches` vision patches,
    `labelled` of the tokens (default: all) with a label; `counts`: parameter_counts(config), if known. 6 x body
    parameters x tokens + 6 x head parameters x labelled tokens (the others' logits serve no loss) + 6 x layers x
    hidden x sum(len^2) (causal attention, forward and backward, per sequence) + 6 x vision parameters x patches
    (vision attention left out). Recomputation is not useful work; LoRA counts as full fine-tuning would."""
    body, head, vision = counts or parameter_counts(config)
    text = config.text_config
    tokens = sum(lengths)
    labelled = tokens if labelled is None else labelled
    attention = 6 * text.num_hidden_layers * text.hidden_size * sum(n * n for n in lengths)
    return 6 * body * tokens + 6 * head * labelled + attention + 6 * vision * patches


def flop_inputs(batch):
    """(sequence lengths, vision patches, labelled tokens) of a collated batch, or of a list of examples: what
    training_flops counts."""
    pixels = ("pixel_values", "pixel_values_videos")
    if isinstance(batch, list):
        return ([len(e["input_ids"]) for e in batch], sum(len(e[k]) for e in batch for k in pixels if e.get(k) is not None),
                sum(int((e["labels"] != IGNORE).sum()) for e in batch))
    if batch.get("cu_seqlens") is not None:  # packed
        lengths = batch["cu_seqlens"].diff().tolist()
    elif batch.get("attention_mask") is not None:  # right-padded rows: the padding is no useful work
        lengths = batch["attention_mask"].sum(1).tolist()
    else:
        lengths = [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    patches = sum(len(batch[k]) for k in pixels if batch.get(k) is not None)
    return lengths, patches, int((batch["labels"] != IGNORE).sum())


def activation_bytes(config, tokens, compiled, patches=None):
    """Bytes a micro-batch of `tokens` tokens keeps for backward, in bf16 -> (per decoder layer, per recomputed decoder
    layer (its input only), per vision block, per recomputed vision block), the vision blocks over `patches` patches
    (the most the micro-batch can hold; default: the most any `tokens` tokens can hold, spatial_merge_size^2 a token,
    a row of images only; text rows never run the blocks, so counting them costs nothing there). Counted: each matmul's input and output, flash attention's output, the norms'
    inputs: what a compiled layer saves; an eager one also keeps fp32 norm and rotary intermediates, ~25% more."""
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    # x, its norm, q, k, v, attention out, x + attention, its norm (2 bytes each); gate, up and their product
    layer = 2 * (4 * text.hidden_size + 2 * q + 2 * kv) + 6 * text.intermediate_size
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # (Qwen2-VL: embed_dim; hidden_size is the LLM's)
    mlp = getattr(vision, "intermediate_size", None) or width * vision.mlp_ratio
    gated = config.model_type == "qwen2_5_vl"  # gate/up/down; Qwen2-VL and Qwen3-VL: fc1, activation, fc2
    block = 2 * 10 * width + (6 if gated else 4) * mlp  # x, norm, q k v, rotated q k, attention out, x + out, norm
    scale = 1.0 if compiled else 1.25
    patches = tokens * vision.spatial_merge_size**2 if patches is None else patches
    return (int(scale * layer * tokens), 2 * text.hidden_size * tokens, int(scale * block * patches), 2 * width * patches)


def fixed_bytes(held, trainable, master_bytes, world_size, unsharded, tokens, vocab, offload=False):
    """GPU bytes of training besides the layers' activations: `held` (what is on the GPU already: the weights as
    loaded and sharded), the gradients and AdamW's two moments of this process's shard of the `trainable` weights
    (in master_bytes; none on the GPU with CPU offload), `unsharded` bytes (FSDP's gathered bf16 parameters and
    unsharded gradients at their peak), and the head: bf16 logits and their gradient for `tokens` tokens, and one
    1024-token chunk of fp32 log-softmax with its gradient."""
    states = 0 if offload else 3 * master_bytes * trainable / world_size
    return int(held + states + unsharded + 4 * tokens * vocab + 12 * 1024 * vocab)


def recompute_plan(budget, fixed, layers, blocks, activations):
    """--gradient_checkpointing auto: the fewest decoder layers and vision blocks to recompute in backward for training
    to fit `budget` bytes, given `fixed` bytes (fixed_bytes) and `activations` (activation_bytes). A recomputed unit
    keeps only its input and rebuilds its activations in backward, one unit at a time: the first units recompute, so
    the later ones have freed theirs by then, unless every decoder layer recomputes. Vision blocks go first: they
    hold more activation per FLOP that recomputing them costs (~1.2 bytes a forward kFLOP, against ~0.6 for a 3B
    decoder layer and ~0.35 for a 7B one), and cost nothing on text rows.
    -> (decoder layers, vision blocks, estimated peak bytes); everything recomputed if nothing fits."""
    layer, layer_input, block, block_input = activations
    for n_layers, n_blocks in [(0, b) for b in range(blocks + 1)] + [(n, blocks) for n in range(1, layers + 1)]:
        rebuilt = layer if n_layers == layers else 0  # (the vision blocks' backward comes after every layer's)
        need = (fixed + (layers - n_layers) * layer + n_layers * layer_input
                + (blocks - n_blocks) * block + n_blocks * block_input + rebuilt)
        if need <= budget:
            break
    return n_layers, n_blocks, need


# ----------------------------------------------------------------------------------------------------------------
# Tiny models: random-initialised, saved like real checkpoints, for the demo and the tests

TINY_MODELS = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")
TINY_VERSION = "1"

QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's template has no default system prompt
QWEN3_VL_TEMPLATE = QWEN2_5_VL_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>", "<answer>", "</answer>"]


def _tiny_tokenizer():
    """A byte-level BPE with Qwen's special tokens, trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    words = ("how many circles squares triangles are there in the image picture video frame this shows has is a an "
             "the of you helpful assistant answer think count red green blue yellow one two three four five yes no "
             "what which color colour shape number system user please describe")
    corpus = [words, " ".join(str(i) for i in range(100)), "How many circles are in the image? There are 3 circles."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def build_tiny_model(name, out_dir, seed=0):
    """Write a tiny random-initialised Qwen-VL checkpoint (config, safetensors, tokenizer, processor configs)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig, AutoModelForImageTextToText, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if name == "tiny-qwen2.5-vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        config, patch_size, template = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens), 14, QWEN2_5_VL_TEMPLATE
    elif name == "tiny-qwen3-vl":
        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                   "mrope_section": [6, 5, 5], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256, deepstack_visual_indexes=[0])
        config, patch_size, template = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens), 16, QWEN3_VL_TEMPLATE
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"], do_sample=False)
    tokenizer.chat_template = template
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, min_pixels=(2 * patch_size) ** 2 * 4,
                                               max_pixels=128 * 128, image_processor_type="Qwen2VLImageProcessor")
    tmp = out_dir + ".tmp"
    # under torch.distributed, transformers writes a model's files on rank 0 only; each builder writes its own copy
    # (resolve_model: the first to finish renames it into place, and that may be any rank)
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(tmp)
    if not os.path.exists(os.path.join(tmp, "model.safetensors")):
        raise RuntimeError(f"transformers wrote no weights for the tiny model in {tmp} (run it in one process first: "
                           f"python -c \"import data; data.resolve_model('{name}')\")")
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    processor_class = "Qwen3VLProcessor" if name == "tiny-qwen3-vl" else "Qwen2_5_VLProcessor"
    video = {"video_processor_type": "Qwen3VLVideoProcessor" if name == "tiny-qwen3-vl" else "Qwen2VLVideoProcessor",
             "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2, "image_mean": image_processor.image_mean,
             "image_std": image_processor.image_std, "size": {"shortest_edge": 4096, "longest_edge": 128 * 28 * 28},
             "processor_class": processor_class}
    for file, content in (("video_preprocessor_config.json", video), ("processor_config.json", {"processor_class": processor_class})):
        with open(os.path.join(tmp, file), "w") as f:
            json.dump(content, f, indent=2)
    with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
        f.write(template)
    os.replace(tmp, out_dir)


def resolve_model(name_or_path):
    """A tiny model's name -> its checkpoint folder (built on first use); anything else is returned as given."""
    if name_or_path not in TINY_MODELS:
        return name_or_path
    root = os.environ.get("TINY_MODEL_DIR", os.path.join(os.path.expanduser("~"), ".cache", "qwen-vl-tiny"))
    path = os.path.join(root, f"{name_or_path}-v{TINY_VERSION}")
    if not os.path.isdir(path):
        os.makedirs(root, exist_ok=True)
        import shutil
        import tempfile

        staging = tempfile.mkdtemp(dir=root)  # concurrent builders (torchrun ranks, pytest workers) never collide
        build_tiny_model(name_or_path, os.path.join(staging, "model"))
        try:
            os.replace(os.path.join(staging, "model"), path)
        except OSError:  # another process finished first
            pass
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The demo task: name the colour of the circle in a 112x112 picture, generated from a seed.
# Colours, not counting: the tiny model learns colours in ~100 steps, and did not learn to count circles in 600.

DEMO_QUESTION = "What color is the circle?"
DEMO_COLORS = {"red": (220, 40, 40), "green": (40, 160, 40), "blue": (40, 80, 220), "yellow": (220, 190, 0),
               "purple": (150, 40, 190)}


def demo_image(rng, color, size=112):
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(215, 255) for _ in range(3)))
    r = rng.randint(12, 22)
    x, y = rng.randint(r + 2, size - r - 2), rng.randint(r + 2, size - r - 2)
    ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=DEMO_COLORS[color])
    return image


def write_mjpeg_avi(path, frames, fps):
    """Frames -> a Motion-JPEG AVI file: a few lines of RIFF so that tests and the demo need no video encoder."""
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.convert("RGB").save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    w, h, n, biggest = frames[0].width, frames[0].height, len(jpegs), max(map(len, jpegs))
    chunk = lambda tag, data: tag + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    group = lambda tag, data: chunk(b"LIST", tag + data)
    avih = struct.pack("<14I", int(1e6 / fps), 0, 0, 0x10, n, 0, 1, biggest, w, h, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, int(fps), 0, n, biggest, 0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    movi, index, offset = b"", b"", 4
    for jpeg in jpegs:
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(jpeg))
        movi += chunk(b"00dc", jpeg)
        offset = 4 + len(movi)
    header = group(b"hdrl", chunk(b"avih", avih) + group(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    body = b"AVI " + header + group(b"movi", movi) + chunk(b"idx1", index)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def write_demo(out_dir, num_train=2000, num_val=100, seed=0):
    """Write the demo task: images/ and {sft,cpt,dpo,rl}_{train,val}.jsonl. Returns out_dir. Idempotent.
    Processes that build it at once (torchrun ranks on a fresh machine) write the same bytes; each file is written
    under a private name and renamed, so no reader ever sees a half-written one."""
    done = os.path.join(out_dir, "DONE-v2")
    if os.path.exists(done):
        return out_dir
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    private = f".{os.getpid()}.tmp"
    for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 10_000)):
        rng = random.Random(split_seed)
        paths = {stage: os.path.join(out_dir, f"{stage}_{split}.jsonl") for stage in ("sft", "cpt", "dpo", "rl")}
        files = {stage: open(path + private, "w") for stage, path in paths.items()}
        for i in range(n):
            color = rng.choice(sorted(DEMO_COLORS))
            name = f"images/{split}_{i:05d}.png"
            image = os.path.join(out_dir, name)
            demo_image(rng, color).save(image + private, format="PNG")
            os.replace(image + private, image)
            wrong = rng.choice([c for c in sorted(DEMO_COLORS) if c != color])
            rows = {"sft": {"messages": [{"role": "user", "content": f"<image>{DEMO_QUESTION}"},
                                         {"role": "assistant", "content": color}], "images": [name]},
                    "cpt": {"text": f"<image>This picture shows a {color} circle.", "images": [name]},
                    "dpo": {"query": f"<image>{DEMO_QUESTION}", "response": color, "rejected_response": wrong,
                            "images": [name]},
                    "rl": {"messages": [{"role": "user", "content": f"<image>{DEMO_QUESTION}"}], "images": [name],
                           "solution": color}}
            for stage, row in rows.items():
                files[stage].write(json.dumps(row) + "\n")
        for stage, f in files.items():
            f.close()
            os.replace(paths[stage] + private, paths[stage])
    open(done, "w").close()
    return out_dir


def demo_path(stage, split):
    """The demo data file for a stage (built on first use, shared by every script and test)."""
    root = os.environ.get("DEMO_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "qwen-vl-tiny", "demo-v2"))
    return os.path.join(write_demo(root), f"{stage}_{split}.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def check_main(argv):
    parser = argparse.ArgumentParser(prog="python data.py check", description="Validate dataset files without training.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--stage", default="auto", choices=["auto", "sft", "pretrain", "dpo", "rl"],
                        help="what the records are for; auto: pretrain for text records, dpo for pairs, else sft")
    parser.add_argument("--media_root", default=None)
    args = parser.parse_args(argv)
    total = bad = 0
    for path in args.files:
        samples, errors = load_file(path, args.stage, args.media_root, skip_bad_records=True, check_media_files=True)
        for error in errors:
            print(error)
        total, bad = total + len(samples) + len(errors), bad + len(errors)
    print(f"{total} record(s) checked, {bad} bad")
    return 1 if bad else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check":
        return check_main(argv[1:])
    if argv and argv[0] == "demo":
        parser = argparse.ArgumentParser(prog="python data.py demo", description="Write the demo task's data files.")
        parser.add_argument("--out", default="demo_data")
        parser.add_argument("--num_train", type=int, default=2000)
        parser.add_argument("--num_val", type=int, default=100)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv[1:])
        print(write_demo(args.out, args.num_train, args.num_val, args.seed))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
