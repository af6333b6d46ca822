"""hpcomm: boundary communicators for heterogeneous-parallel training.

A ``Layout`` says which rows (and column range) of a logical tensor each rank holds; a
``Transform`` moves the tensor from one layout to another and routes its gradient back.
"""

from hpcomm.layout import Layout
from hpcomm.plan import Plan, get_plan
from hpcomm.segments import backends
from hpcomm.transform import Transform

__all__ = ["Layout", "Plan", "Transform", "backends", "get_plan"]
__version__ = "0.1.0"
