"""What emptying the CUDA cache before every `auto` decode cost: consecutive auto decodes, as a batch run makes
them, with the caching allocator's blocks kept (sana-cli now) and with the cache emptied before each decode's
free-memory reading (what it did before).

    python bench/decode_cache_gpu.py                          # on a CUDA machine: 16 decodes at 1024, full DC-AE
    python bench/decode_cache_gpu.py --device cpu --scale tiny --count 3     # smoke test: runs anywhere

Each mode runs in the same process on the same latents (seeded), after one unmeasured decode, in turn
(keep, empty, keep, empty, ...), so clocks and temperatures drift alike. Per decode it records the seconds (the
device synchronised before and after), and over the mode the segments the caching allocator took from the
driver (`segment.all.allocated` of torch.cuda.memory_stats: each is a cudaMalloc) and its peak reserved bytes.
On the CPU both modes run the same code (there is no cache to empty), so the figures only show that the
script works. Results go to bench/results/decode-cache_<date>_<device>_<size>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402

MODES = ("keep", "empty")  # keep: sana-cli's auto decode; empty: torch.cuda.empty_cache() before each reading


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--size", type=int, default=None, help="output pixels on a side (default 1024; tiny 128)")
    parser.add_argument("--count", type=int, default=16, help="measured decodes per mode")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    return parser.parse_args(argv)


def one_decode(vae, latents, device, mode: str) -> tuple[float, str]:
    """One auto decode as runner.decode_frames makes it (free memory, budget, choose, decode)."""
    import torch

    from sana_cli.engine import vae as decoding

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    if mode == "empty" and device.type == "cuda":
        torch.cuda.empty_cache()  # what free_memory_bytes did before every reading
    free = decoding.budget_bytes(decoding.free_memory_bytes(device), None, decoding.in_use_bytes(device))
    decoded = decoding.decode(vae, latents / vae.config.scaling_factor, "auto", free_bytes=free)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, decoded.strategy


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import make_checkpoints

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decode_cache_gpu: CUDA is not available here (use --device cpu for the smoke test)", file=sys.stderr)
        return 4
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = args.size or (1024 if args.scale == "full" else 128)
    vae = make_checkpoints.vae(args.scale, dtype=dtype, device=str(device)).eval()
    ratio = 2 ** (len(vae.config.decoder_block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, size // ratio, size // ratio,
                          generator=torch.Generator().manual_seed(0)).to(device, dtype)
    one_decode(vae, latents, device, "keep")  # warm-up: kernels, cuDNN plans
    seconds = {mode: [] for mode in MODES}
    strategies = {mode: set() for mode in MODES}
    segments = {mode: 0 for mode in MODES}
    peak_reserved = {mode: 0 for mode in MODES}
    for _ in range(args.count):
        for mode in MODES:
            before = torch.cuda.memory_stats(device).get("segment.all.allocated", 0) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            took, strategy = one_decode(vae, latents, device, mode)
            seconds[mode].append(took)
            strategies[mode].add(strategy)
            if device.type == "cuda":
                segments[mode] += torch.cuda.memory_stats(device).get("segment.all.allocated", 0) - before
                peak_reserved[mode] = max(peak_reserved[mode], torch.cuda.max_memory_reserved(device))
    modes = {mode: {"median_seconds": round(statistics.median(seconds[mode]), 5),
                    "seconds": [round(s, 5) for s in seconds[mode]], "strategies": sorted(strategies[mode]),
                    "driver_allocations": segments[mode] if device.type == "cuda" else None,
                    "peak_reserved_bytes": peak_reserved[mode] if device.type == "cuda" else None}
             for mode in MODES}
    keep, empty = modes["keep"]["median_seconds"], modes["empty"]["median_seconds"]
    results = {"benchmark": "decode-cache", "command": _common.command_line(), "date": _common.now().isoformat(),
               "device": _common.describe_device(device), "versions": _common.versions(),
               "sana_cli": _common.sana_cli_info(), "scale": args.scale, "size": size, "dtype": args.dtype,
               "count": args.count, "modes": modes,
               "saving_per_decode_seconds": round(empty - keep, 5) if device.type == "cuda" else None,
               "saving_percent": round(100 * (empty - keep) / empty, 2) if empty and device.type == "cuda" else None}
    stem = f"decode-cache_{_common.now():%Y-%m-%d}_{_common.slug(results['device']['name'])}_{size}"
    _common.write_json(args.results / f"{stem}.json", results)
    lines = [f"# Auto decode: CUDA cache kept vs emptied before each decode ({size}x{size}, {args.dtype}, "
             f"{args.scale} DC-AE, {args.count} decodes per mode)", "",
             f"Device: {results['device']['name']}", "",
             "| mode | median s per decode | driver allocations (cudaMalloc) | peak reserved | strategy |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        m = modes[mode]
        allocations = "—" if m["driver_allocations"] is None else m["driver_allocations"]
        lines.append(f"| {mode} | {m['median_seconds']:.4f} | {allocations} | {_common.gib(m['peak_reserved_bytes'])} "
                     f"| {', '.join(m['strategies'])} |")
    if device.type == "cuda":
        saving, percent = results["saving_per_decode_seconds"], results["saving_percent"]
        lines += ["", f"Saving per decode: {saving:.4f} s ({percent}%)."]
    else:
        lines += ["", "On the CPU both modes run the same code: the difference is noise, not a saving."]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(args.results / f"{stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
