"""What the benchmarks measure outside the profiler (loopback bytes, peak memory, state bytes) and their data."""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.nn import functional as F

# ---------------------------------------------------------------------- measurement


def lo_bytes() -> tuple[int, int]:
    """(rx, tx) byte counters of the loopback interface, from /proc/net/dev."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError("no 'lo' interface in /proc/net/dev")


def _proc_field(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def vm_hwm_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    return _proc_field("/proc/self/status", "VmHWM:") * 1024


def written_bytes() -> int:
    """Bytes this process (all threads) passed to write-like syscalls (``wchar`` of /proc/self/io).

    gloo's TCP transport sends with writev, so between two barriers this counts
    the bytes this rank put on its sockets (plus any file writes, none in the
    timed steps), unaffected by other processes' loopback traffic.
    """
    return _proc_field("/proc/self/io", "wchar:")


def load_average() -> float:
    """The 1-minute load average (other processes on this machine compete for its cores)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_by_name(state: Mapping[Any, Mapping[str, Any]]) -> dict[str, int]:
    """Bytes of a torch.optim ``state`` mapping (param -> dict), by state name."""
    parts: dict[str, int] = {}
    for entry in state.values():
        for name, value in entry.items():
            if torch.is_tensor(value):
                parts[name] = parts.get(name, 0) + value.numel() * value.element_size()
    return parts


# ---------------------------------------------------------------------- data


def corpus() -> tuple[torch.Tensor, str]:
    """About 2 MB of bytes: the standard library's top-level .py files, sorted by name."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total, used = [], 0, 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        used += 1
        if total >= 2_000_000:
            break
    data = b"".join(chunks)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    version = sysconfig.get_python_version()
    return tokens, f"{len(data):,} bytes of {used} .py files of Python {version}'s standard library"


def batch_for(tokens: torch.Tensor, seed: int, step: int, rank: int, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq + 1) windows at offsets drawn from a generator seeded by (seed, step, rank)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


def lm_loss(forward: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    logits = forward(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
