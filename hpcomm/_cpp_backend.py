"""Registers the compiled backends of ``hpcomm._C``: "cpp" (CPU tensors) and, when the extension was
built with CUDA kernels, "cuda". Importing it raises ImportError when the extension is not built."""

from hpcomm import _C
from hpcomm.segments import register_backend

register_backend("cpp", _C.copy_segments)
if _C.is_cuda_compiled():
    register_backend("cuda", _C.copy_segments)
