"""Which memory tier each block of a stage takes: a GPU prefix, then RAM, the rest on disk.

The one rule that the planner (coordinator/planner.py, for every candidate range) and
`wrap` (worker/wrap.py, for one model) apply. Disk blocks stream through STAGING_SLOTS RAM
buffers the size of the largest disk block, so the RAM part is the longest one that
leaves room for them. Sizes are bytes; prefix sums `P` give blocks [a, b) as P[b] - P[a].
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

__all__ = ["STAGING_SLOTS", "disk_fill", "gpu_end"]

# Disk blocks in RAM at once: the one computing and the one being read.
STAGING_SLOTS = 2


def gpu_end(P: Sequence[int], start: int, end: int, room: int) -> int:
    """The end of the longest run of blocks [start, g), g <= end, whose bytes fit `room`
    (>= 0)."""
    return bisect_right(P, P[start] + room, start, end + 1) - 1


def disk_fill(P: Sequence[int], staged: Sequence[int], start: int, *, ram_ok: bool = True,
              disk_ok: bool = True) -> Callable[[int, float], tuple[int, int] | None]:
    """The RAM/disk boundary of blocks [start, end) as `end` grows one block at a time.

    `P`: prefix sums of the blocks' bytes in RAM; `staged`: each block's bytes in a staging
    buffer (its file). Each call `add(gpu, room)` places block `end` and moves `end` on:
    blocks [gpu, r) go to RAM, [r, end) to disk, r the largest whose RAM part and staging
    buffers fit `room` bytes. It returns (r, staging bytes), or None when no r fits (nor
    will for any longer range: a longer range only adds to what each tier holds, so r only
    moves down, O(1) amortised per block).
    """
    end = r = start
    biggest = 0  # largest staged disk block

    def add(gpu: int, room: float) -> tuple[int, int] | None:
        nonlocal end, r, biggest
        end += 1
        if r == end - 1:  # nothing on disk yet: the new block may go to RAM (or GPU) too
            r, biggest = end, 0
        elif staged[end - 1] > biggest:
            biggest = staged[end - 1]
        while P[r] - P[gpu] + STAGING_SLOTS * biggest > room or (r > gpu and not ram_ok):
            if r == gpu or not disk_ok:
                return None
            r -= 1
            if staged[r] > biggest:
                biggest = staged[r]
        return r, STAGING_SLOTS * biggest

    return add
