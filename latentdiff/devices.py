"""Which device and dtype to run on, decided at run time from the machine (never at import), and moving
tensors there without waiting for the GPU."""

from pathlib import Path

import torch

from .errors import FieldError

# precisions by the names users type
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product units


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in /proc/cpuinfo text (x86)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo; empty on systems without it (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether bf16 matmuls run in hardware here (Intel AMX or AVX512-BF16), where a bf16 SD U-Net step is
    ~3x (AMX) or ~2x (AVX512-BF16 alone) faster than fp32 (benchmarks/cpu.md). Without them PyTorch
    emulates bf16 and it is slower than fp32. `cpuinfo` is the text of /proc/cpuinfo, read now when not
    given."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def default_dtype(device: torch.device | str, cpuinfo: str | None = None) -> torch.dtype:
    """The fast dtype that keeps image quality: fp16 on CUDA (the pipeline retries a NaN VAE decode in fp32),
    bf16 on CPUs with native bf16 (PSNR vs fp32 in benchmarks/cpu.md), fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16(cpuinfo):
        return torch.bfloat16
    return torch.float32


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t.to(device)` without making the host wait for the GPU: a copy from ordinary (pageable) host memory
    synchronises with the GPU's queue (cudaStreamSynchronize), one from pinned memory is queued like a
    kernel. The sampling loop's per-step timesteps, sigmas and noise reach the GPU this way."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA if there is one, else the CPU) and the fast dtype for it that keeps image quality:
    fp16 on CUDA, bf16 on CPUs with native bf16 matmuls, fp32 elsewhere (default_dtype). Given ones are
    checked: a device this machine has, a dtype by name or torch dtype."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    return device, default_dtype(device) if dtype is None else parse_dtype(dtype)


def check_device(device) -> torch.device:
    """`device` as a torch.device that this machine has; FieldError("device") otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FieldError("device", f"{device!r} is not a device: use cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FieldError("device", f"{device}: this machine has no CUDA GPU that PyTorch can use "
                                   f"(torch {torch.__version__}); leave it out, or use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FieldError("device", f"{device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FieldError("device", f"{device}: Apple's MPS is not available on this machine; leave it out, or use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise FieldError("device", f"{device}: latentdiff runs on cpu, cuda or mps")
    return device


def parse_dtype(dtype) -> torch.dtype:
    """A torch floating-point dtype, or its name as users type it ("fp16", "bf16", "float32", ...)."""
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[dtype.lower()])
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise FieldError("dtype", f"{dtype!r}: choose one of {', '.join(DTYPE_NAMES)} (or a torch dtype)")
