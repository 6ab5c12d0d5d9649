"""SDS across processes on torch.distributed (issue 17): samples split for the statistics, rows split for the solvers.

Launched with torchrun (WORLD_SIZE > 1 in the environment) `sdsonnx run` joins a gloo process group
(`from_environment`) and every rank runs the same layer-wise loop (sdsonnx/pipeline.py) with a `RankGroup`:

  samples  each rank holds its contiguous slice of every calibration part (`sample_slice`); after each statistics
           pass the Gram sums X X^T, squared norms and token counts are all-reduced (`reduce_stats`), so every rank
           has the same H. Summation order changes: H = (sum over rank 0's segments + sum over rank 1's) / N instead
           of one running sum, a float32 difference of ~1e-7 relative.
  rows     every Linear's stage work (SparseGPT, Wanda, magnitude, the re-dense solver) runs on a contiguous slice
           of output rows (`row_slice`) and the new W is all-gathered (`gather_rows`) before the next forward.
           N:M and per-row masks are row-local. A mask chosen over a whole matrix or column block
           (`prune_lowest`) finds the exact global k-th score by a 4-round radix select on all-reduced 256-bin
           histograms of order-preserving integer keys, then breaks ties by flat index across ranks exactly as
           masks.topk_mask's stable sort does. Solver scalars summed over rows (losses, norms, the restart test)
           are all-reduced in float64 (`sums`): the same bits on every rank, so every rank takes the same branch.

Evaluation windows are split like the calibration segments; each rank's NLL sum is all-reduced (`perplexity`).
Only rank 0 writes the output; see sdsonnx/run.py and docs/SCALING.md. Pure pieces (`order_keys`, `radix_select`, `local_histogram`, `tie_quota`, `even_slice`) take no
process group and are tested on simulated ranks in tests/test_distributed.py.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .errors import InputError
from .masks import nm_mask, prune_count, topk_mask
from .pattern import Pattern
from .stats import LayerStats

log = logging.getLogger(__name__)

KEY_OFFSET = 2 ** 31  # keys live in [0, 2^32)


class DistributedError(InputError, ValueError):
    """A recipe that cannot run on this many ranks (too few samples or windows, a solver that needs every token on
    one rank): exit code 2."""

COLLECTIVE_TIMEOUT_S = 4 * 3600  # gloo's default is 30 min; a 70B block's uneven work (a slow host) may exceed it


def even_slice(total: int, rank: int, world: int) -> slice:
    """The contiguous part [start, stop) of `total` items that `rank` of `world` holds (first total % world ranks
    hold one more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """scores (any shape, float) -> int64 keys [numel] in [0, 2^32) ordered as the float32 values (-0.0 = +0.0)."""
    x = scores.detach().float().reshape(-1) + 0.0  # -0.0 + 0.0 = +0.0: equal keys for the values sort calls equal
    if bool(torch.isnan(x).any()):
        raise ValueError("order_keys: scores contain NaN")
    bits = x.view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, KEY_OFFSET + bits, KEY_OFFSET - 1 - magnitude)


def local_histogram(keys: torch.Tensor, prefix: int, shift: int) -> torch.Tensor:
    """[256] int64 counts of byte (key >> shift) & 255 among the keys whose bits above shift + 8 equal prefix's."""
    chosen = keys[(keys >> (shift + 8)) == (prefix >> (shift + 8))]
    return torch.bincount((chosen >> shift) & 255, minlength=256).to(torch.int64)


def radix_select(histogram: Callable[[int, int], torch.Tensor], k: int) -> tuple[int, int]:
    """(key t of the k-th smallest, 1-based k, how many of the keys equal to t are among the k smallest) from the
    global histograms `histogram(prefix, shift)` of 4 byte rounds (most significant first)."""
    prefix = 0
    for shift in (24, 16, 8, 0):
        cum = histogram(prefix, shift).cumsum(0)
        if k < 1 or k > int(cum[-1]):
            raise ValueError(f"radix_select: k={k} outside 1..{int(cum[-1])}")
        byte = int(torch.nonzero(cum >= k)[0])
        k -= int(cum[byte - 1]) if byte else 0
        prefix |= byte << shift
    return prefix, k


def tie_quota(equal_counts: list[int], need: int, rank: int) -> int:
    """How many of rank's keys equal to the threshold it prunes: ranks hold consecutive flat ranges, lower flat
    index first (the stable sort's order), so the lower ranks' ties go first."""
    before = sum(equal_counts[:rank])
    return max(0, min(equal_counts[rank], need - before))


def lowest_mask(keys: torch.Tensor, threshold: int, quota: int) -> torch.Tensor:
    """[numel] bool, True = pruned: every key below threshold and the first `quota` equal to it (flat order)."""
    pruned = keys < threshold
    equal = torch.nonzero(keys == threshold).reshape(-1)[:quota]
    pruned[equal] = True
    return pruned


@dataclass
class RankGroup:
    """This process's place in the default torch.distributed group, and the collectives the loop uses.

    bytes_moved / comm_seconds count every collective's payload (bytes this rank contributes) and time.
    """

    rank: int
    world: int
    bytes_moved: int = 0
    comm_seconds: float = 0.0
    calls: int = 0
    by_kind: dict = field(default_factory=dict)  # collective kind -> [calls, bytes, seconds]

    def _all_reduce(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(t, op=op)
        self._count(kind, t.numel() * t.element_size(), time.perf_counter() - start)
        return t

    def _count(self, kind: str, nbytes: int, seconds: float) -> None:
        self.bytes_moved += nbytes
        self.comm_seconds += seconds
        self.calls += 1
        entry = self.by_kind.setdefault(kind, [0, 0, 0.0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + nbytes, entry[2] + seconds

    def sample_slice(self, total: int, what: str = "calibration segments per part") -> slice:
        """This rank's share of `total` samples (each rank needs at least one)."""
        if total < self.world:
            raise DistributedError(f"{total} {what} cannot be split over {self.world} ranks: use fewer ranks or more "
                                   "samples")
        return even_slice(total, self.rank, self.world)

    def perplexity(self, local: float, tokens: int) -> float:
        """exp(mean NLL) over every rank's windows from this rank's perplexity over `tokens` predicted tokens: the
        NLL sums (tokens x log perplexity, float64) are all-reduced."""
        total, count = self.sums(tokens * math.log(local), tokens)
        return math.exp(total / count)

    def row_slice(self, rows: int) -> slice:
        return even_slice(rows, self.rank, self.world)

    def sums(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, the same bits on every rank)."""
        t = torch.tensor(values, dtype=torch.float64)
        return [float(v) for v in self._all_reduce(t, "scalars")]

    def all_true(self, flag: bool) -> bool:
        return bool(int(self._all_reduce(torch.tensor([int(flag)]), "scalars", dist.ReduceOp.MIN)[0]))

    def min_int(self, value: int) -> int:
        return int(self._all_reduce(torch.tensor([value], dtype=torch.int64), "scalars", dist.ReduceOp.MIN)[0])

    def barrier(self) -> None:
        dist.barrier()

    def reduce_stats(self, stats: dict[str, LayerStats]) -> None:
        """All-reduce every distinct LayerStats (shared q/k/v ones once): X X^T, squared norms, token count."""
        seen = set()
        for s in stats.values():
            if id(s) in seen:
                continue
            seen.add(id(s))
            if s.keep_inputs:
                raise DistributedError("redense solver: sgd needs every raw input on one rank; it is not supported on "
                                       "several ranks (use solver: gram)")
            if s.sq_norm is None:
                raise ValueError("a rank saw no calibration inputs for a Linear")
            self._all_reduce(s.sq_norm, "stats")
            if s.xtx is not None:
                self._all_reduce(s.xtx, "stats")
            s.count = int(self._all_reduce(torch.tensor([s.count], dtype=torch.int64), "stats")[0])

    def gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The full [rows, ...] tensor from every rank's row_slice part (all_gather, parts padded to equal size)."""
        size = even_slice(rows, 0, self.world)
        longest = size.stop - size.start
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype)
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        start = time.perf_counter()
        dist.all_gather(parts, padded)
        self._count("gather_rows", padded.numel() * padded.element_size(), time.perf_counter() - start)
        sizes = [even_slice(rows, r, self.world) for r in range(self.world)]
        return torch.cat([p[:s.stop - s.start] for p, s in zip(parts, sizes)])

    def numel(self, local: torch.Tensor) -> int:
        """Elements of the whole (row-split) tensor."""
        return int(self._all_reduce(torch.tensor([local.numel()], dtype=torch.int64), "scalars")[0])

    def prune_lowest(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Keep-mask (True = kept) of this rank's rows: the k lowest scores over all ranks' rows together are pruned,
        ties lower flat index first: exactly masks.topk_mask(whole, ., per_row=False) restricted to these rows."""
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        keys = order_keys(scores)
        threshold, need = radix_select(
            lambda prefix, shift: self._all_reduce(local_histogram(keys, prefix, shift), "select"), k)
        equal = torch.zeros(self.world, dtype=torch.int64)
        equal[self.rank] = int((keys == threshold).sum())
        equal = [int(v) for v in self._all_reduce(equal, "select")]
        return ~lowest_mask(keys, threshold, tie_quota(equal, need, self.rank)).reshape(scores.shape)


def select_mask_rows(scores: torch.Tensor, pattern: Pattern, per_row: bool, group: RankGroup | None) -> torch.Tensor:
    """masks.select_mask on this rank's rows of a row-split score matrix [rows, in] (group None: one process, the
    very same call): n:m and per-row groups are row-local, a matrix-wide count is the whole matrix's."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if group is None or per_row:
        return topk_mask(scores, pattern.sparsity, per_row)
    return group.prune_lowest(scores, prune_count(pattern.sparsity, group.numel(scores)))


def from_environment() -> RankGroup | None:
    """A RankGroup on a gloo process group when torchrun started several ranks (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():  # a rank waits in a collective at most as long as the ranks' work differs
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    group = RankGroup(dist.get_rank(), dist.get_world_size())
    log.info("rank %d of %d (gloo)", group.rank, group.world)
    return group


def close(group: RankGroup | None) -> None:
    """Leave the process group (the loop's last collective was run_recipe's barrier)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


class ReadOnlyWeights:
    """A rank other than 0 reads each block from the source shards like shards.StreamedWeights and writes nothing:
    rank 0 writes the output shards (every rank holds the same final weights)."""

    def __init__(self, streamed) -> None:
        self.streamed = streamed

    def load(self, index: int, block) -> None:
        self.streamed.load(index, block)

    def release(self, index: int, block) -> None:
        self.streamed.release(index, block)

    def finish(self, index: int, block) -> None:
        self.streamed.release(index, block)

    def finish_model(self) -> None:
        """Nothing: rank 0 writes the rest of the model and the index."""


def rank_area(output: Path, rank: int) -> Path:
    """The hidden sibling of `output` where rank > 0 keeps its streams and resume states."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.sdsonnx-rank{rank}"


@contextmanager
def rank_work_area(output: Path, rank: int, resume: bool) -> Iterator[Path]:
    """rank_area(output, rank), emptied unless `resume`; removed when the block completes (kept on an error, for a
    later resume)."""
    area = rank_area(output, rank)
    if area.exists() and not resume:
        shutil.rmtree(area)
    area.mkdir(parents=True, exist_ok=True)
    yield area
    shutil.rmtree(area, ignore_errors=True)


class RankCheckpointer:
    """resume.Checkpointer for one rank of several: states of even and odd blocks alternate between two folders, so
    the previous block's state survives a commit; `load` resumes every rank from the newest block all ranks have
    (ranks run in lockstep through the collectives, so they differ by at most one committed block)."""

    def __init__(self, folder: Path, ident: dict, group: RankGroup) -> None:
        from .resume import Checkpointer

        ident = {**ident, "ranks": [group.rank, group.world]}  # a state holds this rank's sample slice
        self.group = group
        self.parity = [Checkpointer(Path(folder) / f"rank-state-{p}", ident) for p in (0, 1)]

    def _next_blocks(self) -> list[int]:
        found = []
        for checkpointer in self.parity:
            path = checkpointer.folder / "state.json"
            if path.is_file():
                try:
                    found.append(int(json.loads(path.read_text())["next_block"]))
                except (ValueError, KeyError, TypeError):
                    continue
        return found

    def load(self):
        """The LoopState of the newest block every rank committed; None (on every rank) when some rank has none."""
        from .resume import ResumeError

        mine = self._next_blocks()
        agreed = self.group.min_int(max(mine, default=0))
        if agreed == 0:
            return None
        if agreed not in mine:
            raise ResumeError(f"rank {self.group.rank}: no resume state of block {agreed} (has {mine}); run without "
                              "--resume to start over")
        state = self.parity[agreed % 2].load()
        if state is None or state.next_block != agreed:
            raise ResumeError(f"rank {self.group.rank}: resume state of block {agreed} unreadable")
        log.info("rank %d resumes at block %d (its states: blocks %s)", self.group.rank, agreed, sorted(mine))
        return state

    def commit(self, state) -> None:
        checkpointer = self.parity[state.next_block % 2]
        checkpointer.folder.parent.mkdir(parents=True, exist_ok=True)
        checkpointer.commit(state)

    def clear(self) -> None:
        for checkpointer in self.parity:
            shutil.rmtree(checkpointer.folder.parent, ignore_errors=True)
