"""Peak FLOP/s of the device, for MFU. The models count their own FLOPs from their configuration
(`model.flops_per_clip(...)`, `models/flops.py`)."""

from __future__ import annotations

import time

import torch

# Dense peak FLOP/s per accelerator from the vendors' datasheets (no sparsity), by precision. MFU is
# measured against these; on a CPU there is no datasheet, so the peak is measured (a large matmul).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM; PCIe parts are ~25% lower
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N fp32 FLOP/s of an n x n x n `torch.mm` on `device`: its practical matmul peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU on this device at this precision."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_FLOPS.items():
            if key in name:
                return table[precision], f"{name} datasheet {precision}"
        return matmul_peak_flops(device), f"{name} measured fp32 matmul (not in PEAK_FLOPS)"
    return matmul_peak_flops(device), "measured CPU fp32 matmul"
