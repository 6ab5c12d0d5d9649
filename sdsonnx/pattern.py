"""What a pruner must produce: unstructured sparsity s, or n kept out of every m consecutive weights."""
from __future__ import annotations

import re
from dataclasses import dataclass

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """`sparsity` is the pruned share for unstructured patterns; n:m keeps `n` of every `m` inputs."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"n:m pattern needs 0 < n < m, got {self.n}:{self.m}")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        elif not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, value: str | float) -> "Pattern":
        """'2:4' -> Pattern(n=2, m=4); 0.5 or '0.5' -> Pattern(sparsity=0.5)."""
        if isinstance(value, str) and (match := _NM.match(value)):
            return cls(n=int(match.group(1)), m=int(match.group(2)))
        return cls(sparsity=float(value))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"
