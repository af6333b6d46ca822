"""Layout advisor: predict and rank encoder/LLM layouts and placements for a cluster.

Pure data (spec), the cost model's pieces (flops, boundary, cost), the search, and the parts that
run things (calibrate, cli). Not imported by ``import hpcomm``; see docs/ADVISOR.md.
"""

from .cost import predict
from .search import Ranking, candidates, rank, table
from .spec import (PRESETS, Candidate, ClusterSpec, DataSpec, ModelSpec, ModuleDims, ModuleSpec,
                   Prediction, Sample)

__all__ = ["PRESETS", "Candidate", "ClusterSpec", "DataSpec", "ModelSpec", "ModuleDims",
           "ModuleSpec", "Prediction", "Ranking", "Sample", "candidates", "predict", "rank", "table"]
