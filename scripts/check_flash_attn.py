"""Which prebuilt flash-attn 2.8.3 wheel fits this machine? No network needed.

flash-attn is optional here (`--attn flash_attention_2`; SDPA is the default). Building it
from source takes an hour and a CUDA toolkit, so the release ships prebuilt wheels whose file
name encodes everything that must match the installed torch:

    flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl
                     |   |        |             |                |
      CUDA major of torch's build  |             Python          platform
                         torch major.minor      C++11 ABI of torch's build

This is the scheme of `get_wheel_url()` in flash-attention's setup.py (v2.8.x): CUDA *major*
only (`cu12`, minor versions are compatible), torch major.minor, `cxx11abi` + TRUE/FALSE from
`torch._C._GLIBCXX_USE_CXX11_ABI`, `cp<major><minor>` twice, and `linux_<machine>` or
`win_amd64`; the file sits at releases/download/v2.8.3/<name>.

    python scripts/check_flash_attn.py           # what this machine needs (CPU torch: explains and exits 0)
    python scripts/check_flash_attn.py --json    # the same as JSON
"""

from __future__ import annotations

import importlib.util
import json
import platform as _platform
import re
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config import Parser  # noqa: E402

FLASH_VERSION = "2.8.3"
RELEASE_URL = "https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/{name}"
# The wheels upstream publishes for v2.8.3 are CUDA 12 builds for torch 2.4 ... 2.9; newer torch
# (2.10+) or CUDA 13 have no official wheel (flash-attention issues #2248, #2299, #2442), so the
# name below may 404 there: then build from source.
KNOWN_TORCH = ("2.4", "2.5", "2.6", "2.7", "2.8", "2.9")
BUILD_FROM_SOURCE = "pip install flash-attn==2.8.3 --no-build-isolation   # compiles; needs nvcc, ninja, ~1 h"


def _python_tag(python: str) -> str:
    """'3.11', '3.11.7', '311' or 'cp311' -> 'cp311'."""
    s = python.strip().lower().removeprefix("cp")
    if "." in s:
        major, minor = s.split(".")[:2]
        return f"cp{major}{minor}"
    if not s.isdigit() or len(s) < 2:
        raise ValueError(f"python version {python!r}: expected e.g. 3.11 or cp311")
    return f"cp{s}"


def _torch_tag(torch_version: str) -> str:
    """'2.8.0+cu128' or '2.8' -> '2.8' (the wheel names carry major.minor only)."""
    m = re.match(r"^(\d+)\.(\d+)", torch_version.strip())
    if not m:
        raise ValueError(f"torch version {torch_version!r}: expected e.g. 2.8.0")
    return f"{m.group(1)}.{m.group(2)}"


def _cuda_tag(cuda: str) -> str:
    """'12.8', '12', 'cu128' or 'cu12' -> 'cu12': setup.py keeps only the major version."""
    s = cuda.strip().lower().removeprefix("cu")
    if "." in s:
        major = s.split(".")[0]
    elif s.isdigit() and len(s) >= 3:      # 'cu128' -> 12, 'cu118' -> 11 (last digit is the minor)
        major = s[:-1]
    else:
        major = s
    if not major.isdigit():
        raise ValueError(f"CUDA version {cuda!r}: expected e.g. 12.8")
    return f"cu{major}"


def _abi_tag(cxx11abi: bool | str) -> str:
    if isinstance(cxx11abi, str):
        value = cxx11abi.strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise ValueError(f"cxx11abi {cxx11abi!r}: expected TRUE or FALSE")
        return value
    return "TRUE" if cxx11abi else "FALSE"


def wheel_name(python: str, torch_version: str, cuda: str, cxx11abi: bool | str, platform: str,
               version: str = FLASH_VERSION) -> str:
    """The release wheel's file name for one combination, e.g.
    wheel_name("3.11", "2.8.0", "12.8", True, "linux_x86_64")
    -> 'flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl'."""
    py = _python_tag(python)
    return (f"flash_attn-{version}+{_cuda_tag(cuda)}torch{_torch_tag(torch_version)}"
            f"cxx11abi{_abi_tag(cxx11abi)}-{py}-{py}-{platform}.whl")


def wheel_url(name: str, version: str = FLASH_VERSION) -> str:
    # '+' is legal in a URL path and is what the release page links use (%2B also works).
    return RELEASE_URL.format(version=version, name=name)


def platform_tag() -> str:
    """setup.py's get_platform(): linux_<machine> (x86_64, aarch64) or win_amd64."""
    if sys.platform.startswith("linux"):
        return f"linux_{_platform.machine()}"
    if sys.platform == "win32":
        return "win_amd64"
    return f"{sys.platform}_{_platform.machine()}"  # macOS: no CUDA, so no wheel either


def flash_attn_status() -> dict[str, Any]:
    """Whether `import flash_attn` works (a wheel for another torch fails at import)."""
    if importlib.util.find_spec("flash_attn") is None:
        return {"importable": False, "version": None, "error": "not installed"}
    try:
        import flash_attn

        return {"importable": True, "version": getattr(flash_attn, "__version__", "?"), "error": None}
    except Exception as e:  # noqa: BLE001 - an ABI mismatch raises ImportError or OSError
        return {"importable": False, "version": None, "error": f"{type(e).__name__}: {e}"[:300]}


def detect() -> dict[str, Any]:
    """Everything the wheel name depends on, read from this interpreter and its torch."""
    info: dict[str, Any] = {"python": _python_tag(f"{sys.version_info.major}.{sys.version_info.minor}"),
                            "platform": platform_tag(), "flash_attn": flash_attn_status(), "notes": []}
    try:
        import torch
    except ImportError:
        info.update(torch=None, cuda=None, cxx11abi=None, cuda_available=False, wheel=None, url=None)
        info["notes"].append("torch is not installed: install the CUDA build of torch first, then run this again")
        return info
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda  # the CUDA of torch's build, not the driver's: that is what must match
    info["cxx11abi"] = _abi_tag(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda"] is None:
        # A CPU build: no flash-attn wheel fits. Show what the CUDA 12 build of the same torch needs.
        name = wheel_name(info["python"], torch.__version__, "12", info["cxx11abi"], info["platform"])
        info.update(wheel=None, url=None, would_need=name, would_need_url=wheel_url(name))
        info["notes"].append(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): "
                             "flash-attn needs a CUDA build of torch and an NVIDIA GPU. SDPA works everywhere.")
        if _torch_tag(torch.__version__) not in KNOWN_TORCH:
            info["notes"].append(f"v{FLASH_VERSION} publishes wheels for torch {KNOWN_TORCH[0]}-{KNOWN_TORCH[-1]} only; "
                                 f"for torch {_torch_tag(torch.__version__)} expect a 404: {BUILD_FROM_SOURCE}")
        return info
    name = wheel_name(info["python"], torch.__version__, info["cuda"], info["cxx11abi"], info["platform"])
    info.update(wheel=name, url=wheel_url(name))
    if _torch_tag(torch.__version__) not in KNOWN_TORCH or _cuda_tag(info["cuda"]) != "cu12":
        info["notes"].append(f"v{FLASH_VERSION} publishes cu12 wheels for torch {KNOWN_TORCH[0]}-{KNOWN_TORCH[-1]}; "
                             f"this combination may have none (a 404): then {BUILD_FROM_SOURCE}")
    if info["platform"] != "linux_x86_64":
        info["notes"].append(f"upstream wheels are mostly linux_x86_64; for {info['platform']} check the release "
                             "page, or build from source")
    if not info["cuda_available"]:
        info["notes"].append("torch has CUDA but sees no GPU here: the wheel installs, but flash-attn runs only on a GPU")
    return info


def report(info: dict[str, Any]) -> str:
    fa = info["flash_attn"]
    lines = [f"python    {info['python']}", f"platform  {info['platform']}",
             f"torch     {info.get('torch') or 'not installed'}",
             f"CUDA      {info.get('cuda') or 'none (CPU build)'}   GPU visible: {info.get('cuda_available')}",
             f"C++11 ABI {info.get('cxx11abi')}",
             f"flash_attn importable: {fa['importable']}" + (f" (version {fa['version']})" if fa["version"] else
                                                             f" ({fa['error']})"), ""]
    if info.get("wheel"):
        lines += [f"wheel: {info['wheel']}", f"link:  {info['url']}", "", f'install: pip install "{info["url"]}"']
    elif info.get("would_need"):
        lines += ["no CUDA build of torch: no flash-attn wheel fits this install.",
                  "With the CUDA 12 build of the same torch it would need:",
                  f"  {info['would_need']}", f"  {info['would_need_url']}"]
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = Parser(description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    info = detect()
    print(json.dumps(info, indent=2) if args.json else report(info))
    return info


if __name__ == "__main__":
    main()
