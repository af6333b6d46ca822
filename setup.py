"""Build and install hpcomm.

The C++ extension ``hpcomm._C`` (CPU kernels, and CUDA kernels when a CUDA toolchain and a CUDA
build of torch are both present) is built with torch's extension builder against the torch that is
already installed, so install with ``pip install --no-build-isolation -e .``.

Environment: HPCOMM_NO_EXT=1 skips the extension entirely; HPCOMM_NO_CUDA=1 skips only CUDA.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("HPCOMM_NO_EXT") == "1":
        print("hpcomm build: extension skipped (HPCOMM_NO_EXT=1)")
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        print("hpcomm build: no C++ sources")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cu_sources = sorted(glob.glob("csrc/kernels/*.cu"))
    want_cuda = os.environ.get("HPCOMM_NO_CUDA") != "1"
    has_cuda = want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if has_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        ext = cpp_extension.CUDAExtension(
            "hpcomm._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            extra_compile_args={**extra, "cxx": extra["cxx"] + ["-DHPCOMM_WITH_CUDA"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "hpcomm._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=["-fopenmp"])
    reason = "CUDA kernels included" if has_cuda else (
        "CPU only: " + ("HPCOMM_NO_CUDA=1" if not want_cuda else
                        "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolchain"))
    print(f"hpcomm build: C++ extension hpcomm._C ({reason})")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()


def _nccl_wheel():
    """The NCCL wheel for the CUDA major of the installed torch (cu12 when torch is a CPU build
    or not importable: the extra then names the common case)."""
    try:
        import torch

        major = torch.version.cuda.split(".")[0] if torch.version.cuda else "12"
    except ImportError:
        major = "12"
    return f"nvidia-nccl-cu{major}"


setup(
    name="hpcomm",
    version="0.1.0",
    description="Boundary communicators for heterogeneous-parallel training",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    packages=find_packages(include=["hpcomm", "hpcomm.*"]) + ["hpcomm.triton_kernels"],
    package_dir={"hpcomm.triton_kernels": "kernels"},
    package_data={"hpcomm": ["py.typed", "_C.pyi"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "triton", "pillow", "matplotlib", "mypy", "pdoc"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "train": ["pillow", "matplotlib"],
        "gpu": [_nccl_wheel(), "triton"],
        "cupy": ["cupy-cuda12x"],
    },
    entry_points={"console_scripts": [
        "hpcomm-demo=hpcomm.tools.demo:main",
        "hpcomm-train=hpcomm.trainer.train:main",
        "hpcomm-bench=hpcomm.tools.bench:main",
        "hpcomm-advise=hpcomm.advisor.cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
