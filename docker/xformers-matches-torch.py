"""Exit 0 when the installed xformers was built for the installed torch (same release, same CUDA).

xformers records its build in xformers/cpp_lib.json; a wheel built for another torch or CUDA cannot
load its C++/CUDA extension (`python -m xformers.info` then reports it unavailable).
"""

import json
import sys
from importlib.resources import files

import torch

build = json.loads(files("xformers").joinpath("cpp_lib.json").read_text())["version"]
built_torch = str(build.get("torch") or "")
built_cuda = build.get("cuda")  # e.g. 1208 for CUDA 12.8
have_cuda = torch.version.cuda
want_cuda = int(have_cuda.split(".")[0]) * 100 + int(have_cuda.split(".")[1]) if have_cuda else None
same_torch = built_torch.split("+")[0] == torch.__version__.split("+")[0]
same_cuda = built_cuda == want_cuda
print(
    f"xformers built for torch {built_torch} (CUDA {built_cuda}); installed torch {torch.__version__} "
    f"(CUDA {have_cuda}): {'match' if same_torch and same_cuda else 'MISMATCH'}"
)
sys.exit(0 if same_torch and same_cuda else 1)
