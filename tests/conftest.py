"""Shared test setup: tiny models and demo data built once per machine, and a small folder of media files."""

import os
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one cache per machine, so the tiny checkpoints and the demo files are built once and shared by every test session
CACHE = os.path.join(tempfile.gettempdir(), "qwenvl-test-cache")
os.environ.setdefault("TINY_MODEL_DIR", os.path.join(CACHE, "models"))
os.environ.setdefault("DEMO_DATA_DIR", os.path.join(CACHE, "demo"))

import data  # noqa: E402  (after the environment, which data reads when it builds paths)

# (width, height) of each test image: square, wide, tall, above the tiny models' max_pixels, below their min_pixels
IMAGE_SIZES = {"square.png": (64, 64), "wide.png": (100, 60), "tall.png": (40, 90), "big.png": (300, 200),
               "small.png": (12, 20)}


@pytest.fixture(scope="session", params=data.TINY_MODELS)
def tiny_model_path(request):
    """The checkpoint folder of each tiny model (a test using this runs once per model)."""
    return data.resolve_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_paths():
    return {name: data.resolve_model(name) for name in data.TINY_MODELS}


def noise_image(width, height, seed):
    """A random picture: resizing and patch order show up in every pixel, unlike a flat colour."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """A folder of media files -> {name: absolute path}: PNGs of several sizes, an 8-frame MJPEG AVI at 4 fps,
    a 2-frame AVI of one picture repeated, a corrupt (truncated) JPEG and a zero-byte file."""
    folder = tmp_path_factory.mktemp("media")
    paths = {}
    for i, (name, (w, h)) in enumerate(IMAGE_SIZES.items()):
        paths[name] = str(folder / name)
        noise_image(w, h, seed=i).save(paths[name])
    # smooth frames: JPEG keeps them close to the source, and frames differ so the temporal order matters
    ramp = np.add.outer(np.arange(56) * 3, np.arange(80) * 2)[..., None]
    frames = [Image.fromarray(np.uint8((ramp + [20 * i, 0, 100]) % 256)) for i in range(8)]
    paths["video.avi"] = str(folder / "video.avi")
    data.write_mjpeg_avi(paths["video.avi"], frames, fps=4)
    paths["still.avi"] = str(folder / "still.avi")
    data.write_mjpeg_avi(paths["still.avi"], [noise_image(90, 50, seed=7)] * 2, fps=4)
    good_jpeg = folder / "good.jpg"
    noise_image(64, 64, seed=8).save(good_jpeg, quality=90)
    paths["corrupt.jpg"] = str(folder / "corrupt.jpg")
    (folder / "corrupt.jpg").write_bytes(good_jpeg.read_bytes()[:300])  # a valid header, then cut off
    paths["empty.png"] = str(folder / "empty.png")
    (folder / "empty.png").write_bytes(b"")
    return paths


def run_torchrun(cmd, output_dir, **kwargs):
    """subprocess.run of a torchrun command line. Run once more, from an empty output_dir, if a process was aborted by
    the C++ runtime ("terminate called without an active exception"): seen about once in 40 two-process gloo runs on
    CPU, at interpreter exit after the training had finished, in PyTorch's code rather than ours. Any other failure
    fails the test at once."""
    import shutil
    import subprocess

    p = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        shutil.rmtree(output_dir, ignore_errors=True)
        p = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return p


def count_gathers(monkeypatch):
    """-> a list that gets one entry each time an FSDP2 unit gathers its weights (in a group of one, a copy), not
    when it is asked to while they are already gathered."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    gathers, unshard = [], _fsdp_param_group.FSDPParamGroup.unshard

    def counted_unshard(group, *args, **kwargs):
        if not group.is_unsharded and group._all_gather_result is None:
            gathers.append(group)
        return unshard(group, *args, **kwargs)

    monkeypatch.setattr(_fsdp_param_group.FSDPParamGroup, "unshard", counted_unshard)
    return gathers
