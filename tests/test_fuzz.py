"""Bad data at scale. A seeded generator writes a few thousand records in every format and stage data.py reads; most
are good, the rest are each broken in one known way (bad JSON, wrong types, missing or corrupt media, decompression
bombs, tag/media mismatches, special tokens, lone surrogates, ...). `data.py check` must name every broken record by
file:line with its reason and no good one, and never crash; loading and encoding with skip_bad_records, through the
functions the train scripts call, must keep exactly the good records and report how many were skipped.
FUZZ_SEED=N python -m pytest tests/test_fuzz.py runs another seed; a failure names the seed and the records."""

import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import data
from conftest import noise_image

SEED = int(os.environ.get("FUZZ_SEED", "0"))
RECORDS_PER_FILE = 500  # one JSONL file per stage (4), plus a JSON array of 150 SFT records
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_ROOT = ""  # the folder of the data files and media/, set by the fuzz_files fixture before any record is made

# ----------------------------------------------------------------------------- media: good, broken, missing

GOOD_IMAGES = {"pic.png": (40, 30, "RGB"), "photo.jpg": (64, 48, "RGB"), "ünï cödé 图片 😀.png": (20, 28, "RGB"),
               "one pixel.png": (1, 1, "RGB"), "strip.png": (200, 1, "RGB"), "sub/dir/tall.png": (10, 60, "RGB"),
               "gray.png": (30, 30, "L"), "alpha.png": (30, 20, "RGBA"), "palette.gif": (25, 25, "P"),
               "deep.png": (16, 16, "I;16"), "cmyk.jpg": (32, 32, "CMYK")}
GOOD_VIDEO = "clip.avi"


def png(width, height, pixels=b""):
    """A PNG whose header declares any size, followed by `pixels` (usually far too few): a bomb costs no memory here."""
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT, VIDEO = "corrupt or not an image", "video .* cannot be read"
# name -> (given as a video?, the reason `check` must give); the bytes are made by bad_media_bytes below
BAD_MEDIA = {"empty.png": (False, r"empty \(0 bytes\)"), "empty.mp4": (True, r"empty \(0 bytes\)"),
             "truncated.jpg": (False, CORRUPT), "truncated.png": (False, CORRUPT), "noise.png": (False, CORRUPT),
             "words.jpg": (False, CORRUPT), "video-as-image.png": (False, CORRUPT), "zero-size.png": (False, CORRUPT),
             "zero-height.png": (False, CORRUPT), "bomb.png": (False, "too large"), "bomb-1x.png": (False, "too large"),
             "wide.png": (False, "201x1 pixels: .*aspect ratio above 200:1"), "noise.mp4": (True, VIDEO),
             "picture.avi": (True, VIDEO), "truncated.avi": (True, VIDEO), "picture-as-video.png": (True, VIDEO)}


def bad_media_bytes(folder):
    photo = encoded(noise_image(64, 48, seed=1), "JPEG")
    picture = encoded(noise_image(40, 30, seed=2), "PNG")
    frames = [Image.fromarray(np.full((56, 80, 3), 30 * i, np.uint8)) for i in range(6)]
    data.write_mjpeg_avi(str(folder / "tmp.avi"), frames, 4)
    avi = (folder / "tmp.avi").read_bytes()
    os.remove(folder / "tmp.avi")
    random_bytes = random.Random(SEED).randbytes(2000)
    return {"empty.png": b"", "empty.mp4": b"", "truncated.jpg": photo[: len(photo) // 2],
            "truncated.png": picture[: len(picture) * 2 // 3], "noise.png": picture[:16] + random_bytes,
            "words.jpg": b"this is not a picture\n" * 20, "video-as-image.png": avi, "zero-size.png": png(0, 0),
            "zero-height.png": png(50, 0),
            "bomb.png": png(100_000, 100_000),  # 10^10 pixels declared: PIL refuses it
            "bomb-1x.png": png(10_000, 10_000, b"\0" * 1000),  # 10^8: between PIL's limit and twice it, PIL only warns
            "wide.png": encoded(noise_image(201, 1, seed=3), "PNG"), "noise.mp4": random_bytes, "picture.avi": picture,
            "truncated.avi": avi[: len(avi) // 4], "picture-as-video.png": picture}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    media = root / "media"
    for name, (w, h, mode) in GOOD_IMAGES.items():
        (media / name).parent.mkdir(parents=True, exist_ok=True)
        image = noise_image(w, h, seed=len(name)).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":  # 16-bit greyscale, which convert() does not make
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
        image.save(media / name)
    frames = [Image.fromarray(np.full((56, 80, 3), (40 * i, 90, 200), np.uint8)) for i in range(6)]
    data.write_mjpeg_avi(str(media / GOOD_VIDEO), frames, fps=4)
    for name, raw in bad_media_bytes(media).items():
        (media / name).write_bytes(raw)
    (media / "folder.png").mkdir()
    return root


# ----------------------------------------------------------------------------- good records

TEXTS = ["how many circles", "What color is the circle?", "ünïcödé ñ 中文 日本語 한국어", "emoji 😀👍🏽 and a family 👩‍👩‍👧",
         "مرحبا بالعالم \u202e reversed", "combining e\u0301 a\u0308", "tabs\tand\nnewlines\r\n", "quotes \" ' \\ slash",
         "json-ish {\"a\": [1, 2]}", "<imag> <video > <IMAGE> not tags", "{{ jinja }} {% raw %}", "a NUL \x00 byte",
         "separators \u2028 \x85 \u2029 in a line", "<think>maybe</think>",
         "<|box_start|>(1,2),(3,4)<|box_end|>"]  # grounding tokens are text the model reads, unlike <|im_start|>
REPLIES = [t for t in TEXTS if t.strip()] + ["three", "red", "4"]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def some_text(rng, blank_ok=False):
    text = rng.choice(TEXTS + ["", "   "] if blank_ok else REPLIES)
    if rng.random() < 0.02:  # a long one
        text += " " + " ".join(rng.choice(REPLIES) for _ in range(rng.randint(100, 400)))
    return text


def insert(rng, text, piece):
    """`piece` at a random place in `text`, never inside a tag (which would break it)."""
    inside = {i for m in re.finditer("<image>|<video>", text) for i in range(m.start() + 1, m.end())}
    at = rng.choice([i for i in range(len(text) + 1) if i not in inside])
    return text[:at] + piece + text[at:]


def conversation(rng, stage, tagged=None, num_images=None):
    """The content of one good record, before it is written in a format: system, turns [[user, reply]], media."""
    num_images = rng.choice([0, 0, 0, 0, 1, 2]) if num_images is None else num_images
    images = [f"media/{rng.choice(sorted(GOOD_IMAGES))}" for _ in range(num_images)]
    videos = [f"media/{GOOD_VIDEO}"] if rng.random() < 0.03 else []
    if rng.random() < 0.3:  # absolute paths, as well as paths relative to the data file
        images = [os.path.join(FUZZ_ROOT, p) for p in images]
    tagged = (stage == "pretrain" or rng.random() < 0.5) if tagged is None else tagged
    conv = {"images": images, "videos": videos, "tagged": tagged, "inline": rng.random() < 0.5}
    if stage == "pretrain":
        conv["text"] = " ".join(some_text(rng) for _ in range(rng.randint(1, 3)))
    else:
        conv["system"] = rng.choice([None, None, some_text(rng, blank_ok=True)])
        conv["turns"] = [[some_text(rng, blank_ok=True), some_text(rng)] for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        if stage == "rl" and rng.random() < 0.6:
            conv["turns"][-1][1] = None  # a prompt alone; with a reply, RL drops the reply
        if stage == "dpo":
            conv["rejected"] = some_text(rng)
        if stage == "rl":
            conv["extra"] = {"solution": rng.choice(["3", 3, 2.5, None, [1, "two"], {"a": {"b": []}}, float("nan"),
                                                     "x" * rng.choice([1, 100_000])])}
    if tagged:
        for tag, media in (("<image>", images), ("<video>", videos)):
            for _ in media:
                add_tag(rng, conv, tag)
    return conv


def add_tag(rng, conv, tag):
    if "text" in conv:
        conv["text"] = insert(rng, conv["text"], tag)
    else:
        turn = rng.choice(conv["turns"])
        turn[0] = insert(rng, turn[0], tag)


def media_fields(rng, record, conv):
    """The media lists, as paths or {"path"|"image"|"url": path}; one file sometimes as "image": path."""
    for key, media in (("images", conv["images"]), ("videos", conv["videos"])):
        wrap = rng.choice([lambda p: p, lambda p: p, lambda p: {"path": p}, lambda p: {key[:-1]: p},
                           lambda p: {"url": p}])
        if len(media) == 1 and rng.random() < 0.3:
            record[key if rng.random() < 0.5 else key[:-1]] = wrap(media[0])  # "image": "a.png", as Qwen's files have
        elif media or rng.random() < 0.2:
            record[key] = [wrap(p) for p in media]
    return record


def parts(rng, text, media):
    """A content string -> typed parts; with `media` (iterators), each tag's part carries its file."""
    out = []
    for piece in re.split("(<image>|<video>)", text):
        if piece in ("<image>", "<video>"):
            kind = piece[1:-1]
            part = {"type": kind}
            path = next(media[kind], None) if media else None
            if path is not None:
                if kind == "image" and rng.random() < 0.5:
                    part = {"type": "image_url", "image_url": {"url": path}}
                else:
                    part[kind] = path
            out.append(part)
        elif piece or rng.random() < 0.3:
            out.append({"type": "text", "text": piece})
    return out


def render(rng, stage, conv, fmt=None):
    """conversation -> (record in one of the formats, its format)."""
    if stage == "pretrain":
        return media_fields(rng, {"text": conv["text"]}, conv), "text"
    fmt = fmt or rng.choice(["ms-swift", "sharegpt", "messages"])
    turns, system, record = conv["turns"], conv["system"], {}
    final = turns[-1][1]
    if fmt == "ms-swift":
        if system is not None:
            record["system"] = system
        if len(turns) > 1 or rng.random() < 0.2:
            record["history"] = [list(t) for t in turns[:-1]]
        record["query"] = turns[-1][0]
        if final is not None:
            record["response"] = final
        if stage == "dpo":
            record["rejected_response"] = conv["rejected"]
    elif fmt == "sharegpt":
        names = {"user": ["human", "user"], "assistant": ["gpt", "assistant", "bot", "model"]}
        speak = lambda role: rng.choice(names[role])
        conversations = [{"from": "system", "value": system}] if system is not None and rng.random() < 0.5 else []
        if system is not None and not conversations:
            record["system"] = system
        for i, (user, reply) in enumerate(turns):
            conversations.append({"from": speak("user"), "value": user})
            if reply is not None and not (stage == "dpo" and i == len(turns) - 1):
                conversations.append({"from": speak("assistant"), "value": reply})
        record["conversations"] = conversations
        if stage == "dpo":
            as_reply = rng.choice([lambda t: t, lambda t: {"from": "gpt", "value": t},
                                   lambda t: [{"role": "assistant", "content": t}]])
            record["chosen"], record["rejected"] = as_reply(final), as_reply(conv["rejected"])
    else:
        inline = conv["inline"] and conv["tagged"]
        media = {"image": iter(conv["images"]), "video": iter(conv["videos"])} if inline else None
        content = lambda text: parts(rng, text, media) if inline or rng.random() < 0.3 else text
        messages = [{"role": "system", "content": content(system)}] if system is not None else []
        chosen_apart = stage == "dpo" and rng.random() < 0.5
        for i, (user, reply) in enumerate(turns):
            messages.append({"role": "user", "content": content(user)})
            if reply is not None and not (chosen_apart and i == len(turns) - 1):
                messages.append({"role": "assistant", "content": content(reply)})
        record["messages"] = messages
        if stage == "dpo" and chosen_apart:
            record["chosen"], record["rejected"] = final, conv["rejected"]
        elif stage == "dpo":
            record["rejected_response"] = conv["rejected"]
        if inline:
            return record | conv.get("extra", {}), fmt
    if rng.random() < 0.1 and stage != "rl":  # columns no format knows are ignored
        record["id"] = rng.choice([7, "x" * 100_000, {"source": ["a", None]}])
    return media_fields(rng, record, conv) | conv.get("extra", {}), fmt


# ----------------------------------------------------------------------------- broken records: one fault each


def with_media(rng, conv, entry, video=False):
    """Put `entry` among the record's images (or videos), with a tag where the record uses tags."""
    media, tag = (conv["videos"], "<video>") if video else (conv["images"], "<image>")
    conv["inline"] = False  # a typed part with an empty path would read as a part without media
    if media:
        media[rng.randrange(len(media))] = entry
    else:
        media.append(entry)
        if conv["tagged"]:
            add_tag(rng, conv, tag)


def text_slots(conv, stage):
    """Every text the record's sample keeps: (container, key) pairs."""
    if stage == "pretrain":
        return [(conv, "text")]
    slots = [(conv, "system")] if conv["system"] else []
    for i, turn in enumerate(conv["turns"]):
        slots.append((turn, 0))
        if turn[1] is not None and not (stage == "rl" and i == len(conv["turns"]) - 1):
            slots.append((turn, 1))
    return slots + ([(conv, "rejected")] if stage == "dpo" else [])


def fault_in_conversation(rng, stage, kind):
    """A conversation-level fault -> (record, reason), or None where it does not apply to the stage."""
    conv = conversation(rng, stage)
    if kind == "empty reply" and stage in ("sft", "dpo"):
        slot = rng.choice([(conv["turns"][-1], 1)] + ([(conv, "rejected")] if stage == "dpo" else []))
        slot[0][slot[1]] = rng.choice(["", " ", "\n\t"])
        return render(rng, stage, conv)[0], "empty"
    if kind == "extra tag":
        conv = conversation(rng, stage, tagged=True)
        add_tag(rng, conv, rng.choice(["<image>", "<video>"]))
        return render(rng, stage, conv)[0], r"<(image|video)> tag\(s\) but"
    if kind == "missing tag":
        conv = conversation(rng, stage, tagged=True, num_images=1 if stage == "pretrain" else 2)
        conv["inline"] = False  # inline, the part that lost its tag would lose its image too
        slot = next(s for s in text_slots(conv, stage) if "<image>" in s[0][s[1]])
        slot[0][slot[1]] = slot[0][slot[1]].replace("<image>", "", 1)
        return render(rng, stage, conv)[0], r"<image> tag\(s\) but"
    if kind == "bad media path":
        entry, reason = rng.choice([
            ("media/no such file.png", "not found"), ("media/folder.png", "not found"), ("gone/ñ 图 😀.jpg", "not found"),
            ("media/new\nline\r.png", r"new\\nline\\r.png not found"),  # escaped: one line per record
            (os.path.join(FUZZ_ROOT, "media", "a\x00b.png"), "not found"), ("https://example.com/a.png", "is a URL"),
            ("", "is not a path"), (5, "is not a path"), ({"x": "a.png"}, "is not a path"), ({"path": 7}, "is not a path"),
            ([7], "is not a path"), (True, "is not a path")])
        with_media(rng, conv, entry, video=rng.random() < 0.2)
        return render(rng, stage, conv)[0], reason
    if kind == "bad media file":
        name, (video, reason) = rng.choice(sorted(BAD_MEDIA.items()))
        path = f"media/{name}" if rng.random() < 0.7 else os.path.join(FUZZ_ROOT, "media", name)
        with_media(rng, conv, path, video)
        return render(rng, stage, conv)[0], reason
    if kind in ("special token", "surrogate"):
        piece = rng.choice(SPECIAL_TOKENS) if kind == "special token" else rng.choice(["\ud800", "\udc00", "\udfff"])
        if kind == "surrogate" and rng.random() < 0.2 and conv["images"]:
            conv["images"][0] += piece
        else:
            holder, key = rng.choice(text_slots(conv, stage))
            holder[key] = insert(rng, holder[key], piece)
        return render(rng, stage, conv)[0], "special token" if kind == "special token" else "surrogate"
    if kind == "tag in a DPO reply" and stage == "dpo":
        holder, key = rng.choice([(conv["turns"][-1], 1), (conv, "rejected")])
        holder[key] = insert(rng, holder[key], rng.choice(["<image>", "<video>"]))
        return render(rng, stage, conv)[0], "DPO reply holds"
    return None


WRONG = [7, 2.5, True, ["x"], {"k": "v"}]  # values of the wrong type, all truthy (a falsy field reads as absent)


def fault_in_fields(rng, stage, kind):
    """A field-level fault (wrong types, broken structure) -> (record, reason), or None where it does not apply."""
    conv = conversation(rng, stage)
    fmt = "text" if stage == "pretrain" else rng.choice(["ms-swift", "sharegpt", "messages"])
    record, _ = render(rng, stage, conv, fmt if fmt != "text" else None)
    if kind == "wrong type":
        if fmt == "text":
            record["text"] = rng.choice(WRONG + [None, "", " \n "])
            return record, "'text' must be"
        if fmt == "ms-swift":
            key = rng.choice(["query", "system", "history", "images", "response"] if "response" in record else
                             ["query", "system", "history", "images"])
            if key == "history":
                record[key] = rng.choice([7, "ab", {"k": "v"}, [["a"]], [["a", "b", "c"]]])
                return record, "'history' must be a list"
            record[key] = rng.choice({"query": WRONG + [None], "images": [7, True, {"k": "v"}, [7]]}.get(key, WRONG))
            return record, "is not a path" if key == "images" else "must be text"
        if fmt == "sharegpt":
            turn = rng.choice(record["conversations"])
            choice = rng.randrange(4)
            if choice == 0:
                record["conversations"] = rng.choice(WRONG[:3] + ["ab", {"k": "v"}, None])
                return record, "'conversations' must be a list"
            if choice == 1:
                record["conversations"][record["conversations"].index(turn)] = rng.choice([7, "ab", [], None,
                                                                                           {"from": "human"}])
                return record, "needs 'from' and 'value'"
            if choice == 2:
                turn["from"] = rng.choice(["narrator", "", 5, None, ["human"], {"k": "v"}])
                return record, "unknown speaker"
            turn["value"] = rng.choice(WRONG + [None])
            return record, "must be text"
        if stage == "dpo" and "rejected_response" in record and rng.random() < 0.5:
            record["rejected_response"] = rng.choice([7, True, 2.5, {"k": "v"}, []])
            return record, "must be a string or a list of parts|empty"
        message = rng.choice(record["messages"])
        choice = rng.randrange(6)
        if choice == 0:
            record["messages"] = rng.choice([7, "ab", {"k": "v"}, None, True])
            return record, "'messages' must be a list"
        if choice == 1:
            record["messages"][record["messages"].index(message)] = rng.choice([7, "ab", [], None, {"role": "user"}])
            return record, "needs 'role' and 'content'"
        if choice == 2:
            message["role"] = rng.choice(["narrator", "", "USER", 5, None, ["user"], {"k": "v"}])
            return record, "unknown role"
        if choice == 3:
            message["content"] = rng.choice([7, 2.5, True, {"k": "v"}, None])
            return record, "must be a string or a list of parts"
        if choice == 4:
            message["content"] = [rng.choice([7, "x", None, ["x"], {"text": "hi"}, {"type": "audio"}, {"type": None}])]
            return record, "has no type text, image or video"
        message["content"] = [{"type": "text", "text": rng.choice([7, None, ["x"], {"k": "v"}])}]
        return record, "needs a string 'text'"
    if kind == "broken turns" and fmt in ("sharegpt", "messages"):
        key, role, says = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
        turns = record[key]
        start = 1 if turns and turns[0][role] == "system" else 0
        choice = rng.randrange(4)
        if choice == 0:
            turns.insert(start, {role: "human" if fmt == "sharegpt" else "user", says: "again"})
            return record, "must alternate user, assistant"
        if choice == 1:
            turns.insert(start, {role: "gpt" if fmt == "sharegpt" else "assistant", says: "first"})
            return record, "must alternate user, assistant"
        if choice == 2:
            turns.insert(start + 1, {role: "system", says: "late"})
            return record, "system message may only come first"
        record.pop("system", None)  # (ShareGPT's top-level system prompt: two would be another fault)
        record[key] = rng.choice([[], [{role: "system", says: "only a system prompt"}]])
        return record, "no user turn|must alternate"  # DPO's chosen reply, given apart, is a turn of its own
    if kind == "no reply" and stage in ("sft", "dpo") and fmt == "ms-swift":
        del record["response"]
        return record, "no assistant reply" if stage == "sft" else "a DPO record needs|no assistant reply"
    if kind == "no rejected reply" and stage == "dpo":
        for key in ("rejected_response", "rejected"):
            record.pop(key, None)
        return record, "a DPO record needs 'rejected_response', or 'chosen' and 'rejected'"
    if kind == "not an object":
        return rng.choice([[record], [], "a string", 42, 1.5, None, True, False]), "must be a JSON object"
    if kind == "unknown format":
        other = [{}, {"prompt": "hi", "completion": "x"}, {"instruction": "hi", "output": "x"}]  # other tools' formats
        return rng.choice(other), "unknown format"
    return None


def fault_in_json(rng, stage, kind):
    """A fault in the line itself -> (bytes of the line, reason)."""
    record, _ = render(rng, stage, conversation(rng, stage))
    line = dumps(rng, record)
    if kind == "truncated":
        return line[: rng.randint(1, len(line) - 1)].encode(), "invalid JSON"
    if kind == "junk":
        junk = bytes(b for b in rng.randbytes(rng.randint(1, 60)) if b not in b"\r\n")
        return rng.choice([b"\x01" + junk, b"{" + junk, b"query: hi, response: x", b"{'query': 'single quotes'}",
                           line.encode() + line.encode(), line.encode() + b",", b'{"a": 1,}']), "invalid JSON|not UTF-8"
    if kind == "not UTF-8":
        return insert(rng, line, "\udcff").encode("utf-8", "surrogateescape"), "not UTF-8"  # a lone 0xff byte
    if kind == "deep nesting":  # deeper than json's recursion limit; or not, and an error message must show it short
        depth = rng.choice([900, 10_000, 100_000])
        return ('{"messages": ' + "[" * depth + "]" * depth + "}").encode(), "invalid JSON|needs 'role' and 'content'"
    if kind == "huge number":
        return (line[:-1] + ', "id": ' + "9" * rng.randint(5000, 20000) + "}").encode(), "invalid JSON"
    if kind == "byte-order mark":  # only the file's first line may start with one
        return b"\xef\xbb\xbf" + line.encode(), "invalid JSON"
    return None


FAULTS = [(fault_in_conversation, ["empty reply", "extra tag", "missing tag", "bad media path", "bad media file",
                                    "bad media file", "special token", "surrogate", "tag in a DPO reply"]),
          (fault_in_fields, ["wrong type", "wrong type", "broken turns", "no reply", "no rejected reply",
                             "not an object", "unknown format"]),
          (fault_in_json, ["truncated", "junk", "not UTF-8", "deep nesting", "huge number", "byte-order mark"])]


def dumps(rng, value, indent=None):
    text = json.dumps(value, ensure_ascii=rng.random() < 0.3, indent=indent)
    try:
        text.encode()
        return text
    except UnicodeEncodeError:  # lone surrogates are written as \ud800 escapes, as other JSON writers do
        return json.dumps(value, indent=indent)


def broken(rng, stage, json_faults=True, first_line=False):
    """-> (record or raw line, reason, fault name): one record with one fault of a kind that applies to the stage."""
    while True:
        make, kinds = rng.choice(FAULTS if json_faults else FAULTS[:2])
        kind = rng.choice(kinds)
        made = None if kind == "byte-order mark" and first_line else make(rng, stage, kind)  # a file may start with one
        if made is not None:
            return made[0], made[1], kind


# ----------------------------------------------------------------------------- files


def write_jsonl(rng, path, stage, n):
    """n records, ~35% broken, with CRLF endings, blank lines and a byte-order mark here and there.
    -> {line: (reason or None for a good record, fault name, the record)}."""
    lines, expected = [], {}
    if rng.random() < 0.3:
        lines.append("\ufeff")  # a byte-order mark, glued to the first record below
    for i in range(n):
        if i == 0 and stage == "sft":  # a first line holding a list: JSON Lines, not a JSON array
            value = [render(rng, stage, conversation(rng, stage))[0]]
            reason, kind = "must be a JSON object", "list line"
        elif rng.random() < 0.35:
            value, reason, kind = broken(rng, stage, first_line=i == 0)
        else:
            value, reason, kind = render(rng, stage, conversation(rng, stage))[0], None, "good"
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else dumps(rng, value)
        text = rng.choice(["", "", "", " ", "\t"]) + text + rng.choice(["", "", "\r", " "])
        if lines and lines[-1] == "\ufeff":
            lines[-1] += text
        else:
            lines.append(text)
        expected[len(lines)] = (reason, kind, value)
        while rng.random() < 0.05:
            lines.append(rng.choice(["", " ", "\r", "\t  "]))
    with open(path, "wb") as f:
        f.write("\n".join(lines).encode("utf-8", "surrogateescape") + (b"\n" if rng.random() < 0.8 else b""))
    return expected


def write_json_array(rng, path, stage, n):
    """The same as a JSON array (elements spread over lines; the element's first line names it); the last element
    is invalid JSON, after which nothing can be read."""
    text, line, expected = "[\n", 2, {}
    for i in range(n):
        if rng.random() < 0.35:
            value, reason, kind = broken(rng, stage, json_faults=False)
        else:
            value, reason, kind = render(rng, stage, conversation(rng, stage))[0], None, "good"
        element = dumps(rng, value, indent=rng.choice([None, 1, 2])) + ",\n"
        expected[line] = (reason, kind, value)
        text += element
        line += element.count("\n")
    expected[line] = ("invalid JSON", "syntax error", '{"query": "hi", "response": }')
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + expected[line][2] + "\n]\n")
    return expected


STAGES = {"sft": "sft", "cpt": "pretrain", "dpo": "dpo", "rl": "rl"}  # file name -> the stage `check` is told
TRAIN_STAGES = {"sft": "sft", "cpt": "sft", "dpo": "dpo", "rl": "rl"}  # ... and the stage the train script loads with


@pytest.fixture(scope="module")
def fuzz_files(fuzz_dir):
    """{file name: (path, the stage check is told, {line: (reason, fault, record)})}, all seeded."""
    global FUZZ_ROOT
    FUZZ_ROOT = str(fuzz_dir)
    rng = random.Random(SEED)
    files = {}
    for name, stage in STAGES.items():
        path = str(fuzz_dir / f"{name}.jsonl")
        files[name] = (path, stage, write_jsonl(rng, path, stage, RECORDS_PER_FILE))
    path = str(fuzz_dir / "sft_array.json")
    files["sft_array"] = (path, "sft", write_json_array(rng, path, "sft", 150))
    return files


def describe(expected, keys, limit=5):
    """The fuzz records at `keys` (lines, or file:line sources), to print when an assertion fails."""
    shown = [f"  {key}: {expected[key][1]} (expects {expected[key][0]!r}): {str(expected[key][2])[:300]!r}"
             for key in sorted(keys)[:limit]]
    return f"FUZZ_SEED={SEED}\n" + "\n".join(shown)


def reported(output, path):
    """`check` output -> {line: message} for one file."""
    found = {}
    for text in output.splitlines():
        if text.startswith(path + ":"):
            line, _, message = text[len(path) + 1 :].partition(": ")
            assert line.isdigit() and message, text
            assert int(line) not in found, f"line {line} reported twice"
            found[int(line)] = message
    return found


# ----------------------------------------------------------------------------- the tests


def test_check_names_every_bad_record(fuzz_files, capsys):
    """`data.py check` (in-process) on every file: each broken record by file:line and its reason, no good record."""
    for name, (path, stage, expected) in fuzz_files.items():
        code = data.main(["check", "--stage", stage, path])
        out = capsys.readouterr().out
        found = reported(out, path)
        bad = {line for line, (reason, _, _) in expected.items() if reason}
        assert set(found) - bad == set(), f"good records reported bad in {name}:\n" + "\n".join(
            f"{found[n]}\n{describe(expected, [n])}" for n in sorted(set(found) - bad)[:5])
        assert bad - set(found) == set(), f"bad records not reported in {name}:\n{describe(expected, bad - set(found))}"
        wrong = [n for n in bad if not re.search(expected[n][0], found[n])]
        assert not wrong, f"wrong reasons in {name}:\n" + "\n".join(
            f"{found[n]}\n{describe(expected, [n])}" for n in wrong[:5])
        assert code == 1 and out.splitlines()[-1] == f"{len(expected)} record(s) checked, {len(bad)} bad"
        kinds = {kind for reason, kind, _ in expected.values() if reason}
        assert len(kinds) >= (8 if name == "sft_array" else 12), kinds  # the seed made many kinds of fault
    # without --stage, each record's stage is guessed (a reply-less record is a good RL prompt): faults of any stage
    # are still named, and nothing crashes
    assert data.main(["check", *[path for path, _, _ in fuzz_files.values()]]) == 1
    out = capsys.readouterr().out
    total = sum(len(expected) for _, _, expected in fuzz_files.values())
    assert out.splitlines()[-1].startswith(f"{total} record(s) checked")
    for path, _, expected in fuzz_files.values():
        kinds = FAULTS[2][1] + ["not an object", "unknown format"]
        missed = {n for n, (_, kind, _) in expected.items() if kind in kinds} - set(reported(out, path))
        assert not missed, describe(expected, missed)


def test_check_command_line(fuzz_files, capsys):
    """The command line prints what the function does, and exits 1 (NULs and escaped newlines in messages too)."""
    paths = [fuzz_files["sft"][0], fuzz_files["sft_array"][0]]
    data.main(["check", "--stage", "sft", *paths])
    expected = capsys.readouterr().out
    result = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "check", "--stage", "sft", *paths],
                            capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout == expected


def test_training_keeps_every_good_record(fuzz_files, tiny_model_paths, capsys, monkeypatch):
    """Load and encode as the train scripts do (data.load_dataset, then data.measure_lengths with skip_bad_records):
    exactly the good records are kept, and the skipped ones are counted on stderr."""
    monkeypatch.delenv("MIN_PIXELS", raising=False)
    monkeypatch.delenv("MAX_PIXELS", raising=False)
    # token limits are a training setting that `check` cannot know: long records fit here
    encoder = data.Encoder(tiny_model_paths["tiny-qwen2.5-vl"], max_length=1 << 16)
    prompt = {"train_on": "none", "add_generation_prompt": True}
    groups = {"sft": ["sft", "sft_array"], "cpt": ["cpt"], "dpo": ["dpo"], "rl": ["rl"]}
    for group, names in groups.items():
        stage, paths = TRAIN_STAGES[group], [fuzz_files[n][0] for n in names]
        expected = {f"{fuzz_files[n][0]}:{line}": info for n in names for line, info in fuzz_files[n][2].items()}
        good = {source for source, (reason, _, _) in expected.items() if reason is None}
        samples = data.load_dataset(paths, stage, seed=SEED, skip_bad_records=True)
        err = capsys.readouterr().err
        for path in paths:  # load_dataset reports the count of records it skipped in each file
            in_file = sum(1 for source in expected if source.rsplit(":", 1)[0] == path)
            loaded = sum(1 for s in samples if s.source.rsplit(":", 1)[0] == path)
            assert f"skipped {in_file - loaded} bad record(s) in {path}; first: {path}:" in err
        sides = [samples]
        if stage == "dpo":  # the rejected side is measured as a sample of its own, as train_dpo does
            sides.append([data.Sample(s.messages[:-1] + [{"role": "assistant", "content": s.rejected}], s.images,
                                      s.videos, source=s.source) for s in samples])
        kept, errors = set(range(len(samples))), []
        for side in sides:
            kept_side, lengths, errors_side, _ = data.measure_lengths(side, encoder, True, 0, prompt if stage == "rl" else None)
            kept, errors = kept & set(kept_side), errors + errors_side
            assert all(n > 0 for n in lengths)
            assert all(re.match(r".+:\d+: \S", e) for e in errors_side)  # every skipped record named by file:line
            if errors_side:  # ... and counted
                assert f"skipped {len(errors_side)} bad record(s) (--skip_bad_records)" in capsys.readouterr().err
        kept_sources = {samples[i].source for i in kept}
        assert kept_sources - good == set(), "bad records kept:\n" + describe(expected, kept_sources - good)
        lost = good - kept_sources
        assert not lost, f"good records lost ({group}):\n" + "\n".join(errors[:5]) + "\n" + describe(expected, lost)
        assert len(kept) == len(good)


def test_unreadable_files_and_specs(tmp_path, capsys):
    """Files that cannot be read and dataset specs that name nothing: a clear error, never a traceback."""
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "list-first.json").write_text('[1, 2]\n{"query": "a", "response": "b"}\n')
    missing, folder, empty = (str(tmp_path / n) for n in ("missing.jsonl", "folder.jsonl", "empty.jsonl"))
    assert data.main(["check", missing, folder, empty, str(tmp_path / "list-first.json")]) == 1
    out = capsys.readouterr().out
    assert f"{missing}: cannot read the dataset file" in out and f"{folder}: cannot read the dataset file" in out
    assert f"{tmp_path / 'list-first.json'}:1: text after the JSON array" in out
    for specs, message in (([""], "empty dataset spec"), ([missing], "cannot read"), ([folder], "cannot read"),
                           ([empty], "no usable records"), ([f"{empty}#10"], "no usable records")):
        with pytest.raises(data.BadRecord, match=message):
            data.load_dataset(specs, "sft")
        with pytest.raises(data.BadRecord, match="empty dataset spec" if specs == [""] else "no usable records"):
            data.load_dataset(specs, "sft", skip_bad_records=True)  # an unreadable file is skipped, and reported


def test_big_json_array_reads_in_linear_time(tmp_path):
    """Each element's line was counted from the start of the file: 100k records took 7 minutes, now 0.3 s."""
    n, record = 50_000, json.dumps({"query": "how many circles", "response": "three"})
    (tmp_path / "big.json").write_text("[\n" + ",\n".join([record] * n) + "\n]\n")
    start = time.perf_counter()
    assert [line for line, _ in data._read_records(str(tmp_path / "big.json"))] == list(range(2, n + 2))
    assert time.perf_counter() - start < 10  # counting from the start took ~100 s here
