"""The CPU allocator's peak from torch.profiler's allocation events, shared by the memory tests."""
from __future__ import annotations


def cpu_alloc_peak_of(events) -> int:
    """The peak of the running total of the CPU allocations under ``events`` (profiler event-tree
    nodes, their children included), above what was live before the first: frees are negative sizes."""
    from torch._C._profiler import _EventType

    allocs, stack = [], list(events)
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak
