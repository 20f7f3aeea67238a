"""Which low-precision kernels are faster than fp32 on this CPU, at the issue-11 sizes (one run, interleaved).

    python benchmarks/native_kernels.py [--rounds 7] [--threads 2] [--only gemm|conv|cast]

Per GEMM shape (M x K x N: an (M, K) by (K, N) product): fp32 ``torch.mm``; ``torch._int_mm``
(int8 operands, int32 accumulation, exact); bf16 ``torch.mm`` (bf16 output: rounded to 8
significant bits); oneDNN ``qlinear_pointwise`` (uint8 x int8 prepacked, fp32 output). Per conv
(3x3, N128 C16 32x32 -> 16, the issue's CIFAR layer): fp32 NCHW and channels_last, bf16
channels_last, oneDNN ``qconv_pointwise`` (uint8 x int8 prepacked, fp32 output). Plus the casts a
native path pays around the GEMM (fp32 -> int8 codes; int32 -> fp32 with a scale).

Every round runs every variant once (each timed as the mean of a few calls), so noise from the
other sessions sharing the machine hits all variants alike; the table gives the median over rounds
and the ratio to fp32 measured in the same rounds. The exactness column checks each low-precision
product against an fp64 product of the same integer operands (max |error| / max |exact|).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

GEMMS = [  # (M, K, N, what)
    (4096, 1024, 1024, "issue: 4096x1024x1024"),
    (2048, 4096, 1024, "issue: 2048x4096x1024"),
    (8192, 576, 64, "issue: CIFAR conv as GEMM"),
    (4096, 512, 1536, "transformer qkv fwd (B32 T128 d512)"),
    (4096, 512, 2048, "transformer mlp1 fwd"),
    (4096, 2048, 512, "transformer mlp2 fwd / mlp1 g x w"),
    (2048, 4096, 512, "transformer mlp1 g x a (dW^T: N x tokens x K)"),
]


def _time(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def _interleaved(variants: Dict[str, Callable[[], object]], rounds: int, inner: int) -> Dict[str, float]:
    for fn in variants.values():  # warm-up: oneDNN primitive creation, allocator
        fn()
        fn()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, inner))
    return {name: statistics.median(t) for name, t in times.items()}


def _rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


def gemm_rows(rounds: int) -> List[Tuple]:
    rows = []
    for m, k, n, what in GEMMS:
        torch.manual_seed(0)
        a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        a32, b32 = a8.float(), b8.float()
        a16, b16 = a32.bfloat16(), b32.bfloat16()  # |v| <= 256: exact in bf16
        au8 = (a8.to(torch.int16) + 128).to(torch.uint8)
        variants = {"fp32": lambda: torch.mm(a32, b32), "int8 _int_mm": lambda: torch._int_mm(a8, b8),
                    "bf16 mm": lambda: torch.mm(a16, b16)}
        exact = a8.double() @ b8.double()
        errors = {"fp32": _rel_error(torch.mm(a32, b32), exact),
                  "int8 _int_mm": _rel_error(torch._int_mm(a8, b8), exact),
                  "bf16 mm": _rel_error(torch.mm(a16, b16), exact)}
        try:
            packed = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), [m, k])
            wscale, wzp = torch.ones(n), torch.zeros(n, dtype=torch.int64)
            qlin = lambda: torch.ops.onednn.qlinear_pointwise(au8, 1.0, 128, packed, wscale, wzp, None, 1.0, 0,
                                                              torch.float32, "none", [], "")
            errors["onednn qlinear u8s8"] = _rel_error(qlin(), exact)
            variants["onednn qlinear u8s8"] = qlin
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  onednn qlinear_pointwise unavailable at {m}x{k}x{n}: {type(e).__name__}: {str(e)[:120]}")
        med = _interleaved(variants, rounds, inner=3 if m * k * n > 2e9 else 10)
        for name, t in med.items():
            rows.append((f"{m}x{k}x{n}", what, name, t, t / med["fp32"], errors[name]))
    return rows


def conv_rows(rounds: int) -> List[Tuple]:
    torch.manual_seed(0)
    x8 = torch.randint(0, 256, (128, 16, 32, 32)).to(torch.uint8)
    w8 = torch.randint(-127, 128, (16, 16, 3, 3), dtype=torch.int8)
    x32, w32 = x8.float(), w8.float()
    xcl = x32.contiguous(memory_format=torch.channels_last)
    wcl = w32.contiguous(memory_format=torch.channels_last)
    x16, w16 = xcl.bfloat16(), wcl.bfloat16()
    conv = lambda x, w: F.conv2d(x, w, None, 1, 1)
    exact = F.conv2d(x8.double(), w8.double(), None, 1, 1)
    variants = {"fp32 NCHW": lambda: conv(x32, w32), "fp32 channels_last": lambda: conv(xcl, wcl),
                "bf16 channels_last": lambda: conv(x16, w16)}
    errors = {"fp32 NCHW": _rel_error(conv(x32, w32), exact), "fp32 channels_last": _rel_error(conv(xcl, wcl), exact),
              "bf16 channels_last": _rel_error(conv(x16, w16), exact)}
    try:
        wscale, wzp = torch.ones(16), torch.zeros(16, dtype=torch.int64)
        packed = torch.ops.onednn.qconv_prepack(w8, wscale, 1.0, 0, [1, 1], [1, 1], [1, 1], 1, list(x8.shape))
        xq = x8.contiguous(memory_format=torch.channels_last)
        qconv = lambda: torch.ops.onednn.qconv_pointwise(xq, 1.0, 0, packed, wscale, wzp, None, [1, 1], [1, 1], [1, 1],
                                                         1, 1.0, 0, torch.float32, "none", [], "")
        errors["onednn qconv u8s8"] = _rel_error(qconv(), exact)
        variants["onednn qconv u8s8"] = qconv
    except Exception as e:  # noqa: BLE001
        print(f"  onednn qconv_pointwise unavailable: {type(e).__name__}: {str(e)[:160]}")
    med = _interleaved(variants, rounds, inner=3)
    return [("3x3 N128 C16 32x32", "issue: CIFAR conv fwd", name, t, t / med["fp32 NCHW"], errors[name])
            for name, t in med.items()]


def cast_rows(rounds: int) -> List[Tuple]:
    """What a native path pays around its GEMM: codes out of fp32, a scaled fp32 output back."""
    torch.manual_seed(0)
    x = torch.randn(4096, 2048)
    scale = x.abs().amax() / 127
    acc = torch.randint(-2**20, 2**20, (4096, 2048), dtype=torch.int32)
    variants = {
        "fp32 copy (baseline)": lambda: x.clone(),
        "round(x/s) -> int8": lambda: torch.div(x, scale).round_().to(torch.int8),
        "x -> bf16": lambda: x.bfloat16(),
        "int32 acc * s -> fp32": lambda: acc.float().mul_(scale),
        "aminmax": lambda: torch.aminmax(x),
    }
    med = _interleaved(variants, rounds, inner=10)
    base = med["fp32 copy (baseline)"]
    return [("4096x2048 (8M el.)", "elementwise", name, t, t / base, float("nan")) for name, t in med.items()]


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2")))
    return f"{model}; {' '.join(keep)}; torch capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("gemm", "conv", "cast"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"CPU: {cpu_flags()}")
    rows = []
    if args.only in (None, "gemm"):
        rows += gemm_rows(args.rounds)
    if args.only in (None, "conv"):
        rows += conv_rows(args.rounds)
    if args.only in (None, "cast"):
        rows += cast_rows(args.rounds)
    head = ("shape", "what", "variant", "ms", "x fp32", "rel.err")
    table = [head] + [(s, w, v, f"{t:.3f}", f"{r:.2f}", "-" if e != e else f"{e:.1e}") for s, w, v, t, r, e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
