"""Parallel degrees of one module (pure data: the advisor reads them without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def parse(cls, text: str) -> "ParallelDims":
        """'dp=2,tp=2' -> ParallelDims(dp=2, cp=1, tp=2, pp=1)."""
        dims = {}
        for item in filter(None, text.replace(" ", "").split(",")):
            key, _, value = item.partition("=")
            if key not in ("dp", "cp", "tp", "pp") or not value.isdigit() or int(value) < 1:
                raise ValueError(f"bad parallel degree {item!r} in {text!r} "
                                 "(want dp=,cp=,tp=,pp= >= 1)")
            dims[key] = int(value)
        return cls(**dims)

    @property
    def size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def stage(self) -> "ParallelDims":
        """The degrees of one pipeline stage."""
        return replace(self, pp=1)

    def stage_ranks(self, ranks: list[int]) -> list[list[int]]:
        """The ranks of each pipeline stage: PP is the slowest dim (Megatron's order)."""
        n = self.stage.size
        return [ranks[s * n:(s + 1) * n] for s in range(self.pp)]

    def __str__(self) -> str:
        return f"dp={self.dp},cp={self.cp},tp={self.tp}" + (f",pp={self.pp}" if self.pp > 1 else "")
