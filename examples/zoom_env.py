"""
examples/zoom_env.py: a crop-and-zoom tool for multi-turn GRPO (train_grpo.py --multi_turn_plugin).

    python train_grpo.py --model outputs/sft_for_grpo/checkpoint-70 --multi_turn_plugin examples/zoom_env.py \\
        --max_turns 2 --max_completion_length 24     # the demo's plumbing (its prompts never offer the tool: 1 turn)
    python train_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset rl.jsonl --train_type lora --learning_rate 1e-5 \\
        --multi_turn_plugin examples/zoom_env.py --max_turns 3 --max_completion_length 512 --max_length 8192

A reply may ask to look closer with <zoom>x0,y0,x1,y1</zoom>, a box in pixels of the record's first image as the
file has it (x to the right, y down, x1 and y1 excluded). The next user turn is that region, cropped and scaled up to
at least 56 x 56 pixels (Qwen2.5-VL's smallest image), with "Here is the zoomed region. <image> Answer the question.".
A reply without a zoom tag is the answer: the episode ends, and the rewards score it (`completions`) with the whole
conversation beside it (`messages`). A malformed box is not an error: the next user turn says what is wrong with it.
The system prompt or the question has to tell the model about the tool, e.g. "To look closer at a part of the image,
reply with <zoom>x0,y0,x1,y1</zoom> only (pixels of the image, which is W x H)". Qwen2.5-VL's grounding boxes are in
pixels of the image as the model sees it (resized to within --max_pixels), Qwen3-VL's on a 0-1000 scale: a model
that is to use its grounding as it was trained gets images that are not resized, or an env that scales the box.
"""
import math
import re

from PIL import Image

ZOOM = re.compile(r"<zoom>(.*?)</zoom>", re.DOTALL)
MIN_SIDE = 56  # pixels: Qwen2.5-VL's smallest image (min_pixels 56 x 56), so a small crop is not stretched by the processor


def parse_box(text, width, height):
    """The inside of a zoom tag -> (box, None), the box (x0, y0, x1, y1) in the whole pixels it covers, cut to the
    image of width x height; or (None, what is wrong with it)."""
    parts = text.split(",")
    if len(parts) != 4:
        return None, f"expected 4 numbers x0,y0,x1,y1, got {len(parts)} part(s)"
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        return None, "not all of x0,y0,x1,y1 are numbers"
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        return None, "not all of x0,y0,x1,y1 are finite"
    if x1 <= x0 or y1 <= y0:
        return None, "x1 must be greater than x0 and y1 greater than y0"
    box = (max(0, math.floor(x0)), max(0, math.floor(y0)), min(width, math.ceil(x1)), min(height, math.ceil(y1)))
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, f"it does not overlap the image, which is {width} x {height} pixels"
    return box, None


def zoom(image, box):
    """The box cropped out of the image, scaled up (its aspect kept) until its shorter side is MIN_SIDE but never
    beyond the image's longer side; a side still short of MIN_SIDE (a thin strip) is stretched to it."""
    crop = image.crop(box)
    w, h = crop.size
    scale = max(1.0, min(MIN_SIDE / min(w, h), max(image.size) / max(w, h)))
    return crop.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))), Image.BICUBIC)


def step(messages, completion, turn, images=(), max_turns=None, **columns):
    """train_grpo.py's multi-turn plugin: after reply `turn` (`completion`; `messages`: the conversation so far),
    the next user turn, or None to end the episode."""
    match = ZOOM.search(completion)
    if match is None or (max_turns is not None and turn >= max_turns):  # an answer, or no turn left to use a zoom
        return None
    if not images:
        return {"content": "There is no image to zoom into. Answer the question.", "images": []}
    first = images[0] if isinstance(images[0], Image.Image) else Image.open(images[0])
    first = first.convert("RGB")
    box, error = parse_box(match.group(1), *first.size)
    if error:
        return {"content": f"The box {match.group(1).strip()!r} is invalid: {error}. Reply with <zoom>x0,y0,x1,y1</zoom>, "
                           f"0 <= x0 < x1 <= {first.width} and 0 <= y0 < y1 <= {first.height} (pixels of the first image), "
                           f"or answer the question.", "images": []}
    return {"content": "Here is the zoomed region. <image> Answer the question.", "images": [zoom(first, box)]}
