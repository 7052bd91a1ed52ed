"""``lora-kernels demo | bench | info``."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    from lora_kernels import __version__
    from lora_kernels.ops import backend

    print(f"lora-kernels {__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        print(f"triton       {triton.__version__}")
    except ImportError:
        print("triton       not installed")
    for name in ("peft", "transformers", "safetensors"):
        try:
            mod = __import__(name)
            print(f"{name:<12} {getattr(mod, '__version__', '?')}")
        except ImportError:
            print(f"{name:<12} not installed (pip install 'lora-kernels[peft]')")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device {i}     {torch.cuda.get_device_name(i)}")
    else:
        print("devices      CPU only (no CUDA device visible)")
    print("backends:")
    for name, why in backend.describe().items():
        print(f"  {name:<7} {why}")
    print(f"  auto    CPU tensors -> torch; CUDA tensors -> per-shape table, else triton "
          f"(env {backend.ENV_VAR} overrides)")
    return 0


DESCRIPTION = ("lora-kernels: fused LoRA kernels for PyTorch. Commands: demo (the tour), "
               "bench (the benchmark suite), info (versions, devices, backends).")


def main(argv=None) -> int:
    from lora_kernels.bench_runner import ALIASES, ORDER

    parser = argparse.ArgumentParser(prog="lora-kernels", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, available backends and why not")
    demo = sub.add_parser("demo", help="fine-tune a small model and serve a mixed-adapter batch")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    demo.add_argument("--multi-train", action="store_true",
                      help="instead: train 4 adapters jointly in one batch, save, reload in PEFT")
    bench = sub.add_parser("bench", help="run the benchmark suite and write results files")
    bench.add_argument("--quick", action="store_true", help="small sizes, runs on CPU in minutes")
    bench.add_argument("--out", default=None, help="results directory (default bench/results/<device>)")
    aliases = ", ".join(f"{a}={n}" for a, n in ALIASES.items())
    bench.add_argument("--only", default=None,
                       help=f"comma-separated benchmark names, from: {', '.join(ORDER)} "
                            f"(short names: {aliases})")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd == "demo" and args.multi_train:
        from lora_kernels.demo_multi import run_multi_train
        return run_multi_train(steps=args.steps, device=args.device)
    if args.cmd == "demo":
        from lora_kernels.demo import run_demo
        return run_demo(device=args.device, steps=args.steps)
    from lora_kernels.bench_runner import run_benchmarks
    return run_benchmarks(quick=args.quick, out=args.out, only=args.only)


if __name__ == "__main__":
    sys.exit(main())
