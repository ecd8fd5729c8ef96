"""Decode strategies of the full-size DC-AE on the CPU, in fp32, each in a fresh process.

    python bench/decode_cpu.py                                  # 1024x1024: full, strips, patch-conv, tiled:512
    python bench/decode_cpu.py --size 512 --strategies full,strips:4,strips:8,strips:16,strips:32,strips:64

The same latents (seeded, 32 channels, size/32 on a side) are decoded with each strategy of
sana_cli.engine.vae in its own subprocess, so each peak RSS is clean. Per strategy it records wall
seconds of the decode, the peak RSS above the baseline after the model is loaded (VmHWM reset
with /proc/self/clear_refs just before the decode), the process's whole-life peak (wait4), and the
difference from `full`: max abs difference of the decoded float tensor, and PSNR / max abs
difference of the uint8 images the pipeline would write.

Strategy names: full, strips (sana-cli's default strip height), strips:R (R rows of the
decoder tail's input per strip), patch-conv, tiled (1024 px tiles) or tiled:T.

The DC-AE is the one make_checkpoints.py writes (random weights, stored in bf16, loaded as fp32);
without --vae it is written to bench/checkpoints/full/components/vae first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402

DEFAULT_STRATEGIES = "full,strips,patch-conv,tiled:512"
LATENT_SEED = 0


def default_vae_dir() -> Path:
    return HERE / "checkpoints" / "full" / "components" / "vae"


def ensure_vae(directory: Path) -> Path:
    """The full-size DC-AE at directory, written with make_checkpoints' recipe if missing."""
    if (directory / "config.json").is_file():
        return directory
    import torch

    import make_checkpoints

    model = make_checkpoints.vae("full", dtype=torch.bfloat16)
    model.save_pretrained(directory, variant="bf16")
    make_checkpoints._add_plain_names(directory, "bf16")
    return directory


def parse_strategy(text: str) -> tuple[str, int | None]:
    name, _, value = text.partition(":")
    if name not in ("full", "strips", "patch-conv", "tiled"):
        raise ValueError(f"unknown strategy {text!r}")
    return name, int(value) if value else None


# ---- child ---------------------------------------------------------------------------------------

def child(args) -> int:
    """Decode once with one strategy; print a JSON line; save the decoded tensor."""
    import torch
    from diffusers import AutoencoderDC

    from sana_cli.engine import vae as decoding

    torch.set_grad_enabled(False)
    started = time.perf_counter()
    vae = AutoencoderDC.from_pretrained(args.vae, variant="bf16", torch_dtype=torch.float32).eval()
    latents = torch.load(args.latents)
    load_seconds = time.perf_counter() - started
    import gc

    gc.collect()
    name, value = parse_strategy(args.child)
    kwargs = {}
    if name == "strips" and value is not None:
        kwargs["strip_rows"] = value
    if name == "tiled":
        kwargs["tile_size"] = value or decoding.TILE_SIZE
    info = {"strategy": args.child, "threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 2)}
    if name == "strips":
        info.update(tail_input_rows=latents.shape[-2] * decoding.spatial_ratio(vae) // decoding._tail_scale(vae),
                    tail_scale=decoding._tail_scale(vae), halo_rows=decoding.tail_halo(vae),
                    rows=value or decoding.default_strip_rows(vae, latents.shape[-2]))
    with _common.PeakMemory(torch.device("cpu")) as memory:
        t0 = time.perf_counter()
        result = decoding.decode(vae, latents, name, **kwargs)
        seconds = time.perf_counter() - t0
    info.update(label=result.strategy, seconds=round(seconds, 2), baseline_rss_bytes=memory.baseline,
                peak_rss_bytes=memory.peak, peak_above_baseline_bytes=memory.peak - memory.baseline,
                memory_kind=memory.kind, fallbacks=list(result.fallbacks), shape=list(result.image.shape))
    torch.save(result.image.contiguous(), args.out)
    print(json.dumps(info))
    return 0


# ---- parent --------------------------------------------------------------------------------------

def to_uint8(image):
    """What the pipeline writes: (x / 2 + 0.5).clamp(0, 1) * 255, rounded (diffusers' postprocess)."""
    import numpy as np

    array = (image[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (array * 255).round().astype(np.uint8)


def compare(reference, other) -> dict:
    import numpy as np

    a, b = to_uint8(reference).astype(np.int16), to_uint8(other).astype(np.int16)
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    return {"max_abs_diff_float": float((reference.float() - other.float()).abs().max()),
            "max_abs_diff_uint8": int(np.abs(a - b).max()),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2),
            "identical_uint8": mse == 0.0}


def markdown(results: dict) -> str:
    device = results["device"]
    lines = [f"# DC-AE decode on the CPU (fp32, full-size f32c32, random weights): {results['size']}x{results['size']}",
             "", f"- command: `{results['command']}`", f"- date: {results['date']}",
             f"- machine: {device['cpu']}, {device['cpu_cores']} cores, {_common.gib(device['memory_bytes'])} RAM, "
             f"torch threads {results['runs'][0].get('threads') if results['runs'] else '?'}",
             f"- versions: python {results['versions']['python']}, torch {results['versions']['torch']}, "
             f"diffusers {results['versions']['diffusers']}, patch_conv {results['versions']['patch_conv']}, "
             f"sana-cli {results['sana_cli']['version']} ({(results['sana_cli'].get('git_commit') or '?')[:10]})",
             f"- load average at start / end: {results.get('load_average_at_start')} / "
             f"{results.get('load_average_at_end')} (2 cores: anything above ~0.1 besides this run skews the seconds)",
             f"- latents: 1x32x{results['size'] // 32}x{results['size'] // 32}, N(0,1)/0.41407, seed {LATENT_SEED}; "
             "each strategy in a fresh process", "",
             "| strategy | ran as | decode s | peak RSS above loaded model | process peak RSS | max abs diff vs full "
             "(float) | uint8 max diff | PSNR vs full |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        if "error" in run:
            lines.append(f"| {run['strategy']} | **failed** | | | | | | {run['error']} |")
            continue
        diff = run.get("vs_full") or {}
        psnr = "—" if not diff else ("∞ (identical)" if diff["identical_uint8"] else f"{diff['psnr_db']:.2f} dB")
        float_diff = "—" if not diff else f"{diff['max_abs_diff_float']:.3g}"
        lines.append(f"| {run['strategy']} | {run['label']} | {run['seconds']:.1f} | "
                     f"{_common.gib(run['peak_above_baseline_bytes'])} | "
                     f"{_common.gib(run['process_peak_rss_bytes'])} | "
                     f"{float_diff} | {diff.get('max_abs_diff_uint8', '—')} | {psnr} |")
    strips = [run for run in results["runs"] if run.get("rows")]
    if strips:
        first = strips[0]
        lines += ["", f"Strips: the decoder's attention stages run whole on {first['tail_input_rows']} rows, then the "
                      f"local tail (x{first['tail_scale']} upsampling) runs per strip of `rows` input rows plus a halo "
                      f"of {first['halo_rows']} rows on each side, cropped away afterwards."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels (multiple of 32)")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--vae", default=None, help="DC-AE directory (default: make_checkpoints' full-size one)")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--name", default=None, help="results file stem (default decode-cpu_<date>_<cpu>_<size>)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    if args.size % 32:
        parser.error("--size must be a multiple of 32")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for strategy in strategies:
        parse_strategy(strategy)
    if "full" not in strategies:
        strategies.insert(0, "full")
    vae_dir = ensure_vae(Path(args.vae) if args.vae else default_vae_dir())
    scratch = Path(tempfile.mkdtemp(prefix="decode-cpu-"))
    side = args.size // 32
    latents = torch.randn(1, 32, side, side, generator=torch.Generator().manual_seed(LATENT_SEED)) / 0.41407
    torch.save(latents, scratch / "latents.pt")
    date = _common.now()
    results = {"schema": 1, "command": _common.command_line(["bench/decode_cpu.py", *(sys.argv[1:] if argv is None
                                                                                       else argv)]),
               "date": date.isoformat(), "size": args.size, "vae": str(vae_dir),
               "device": _common.describe_device(torch.device("cpu")), "versions": _common.versions(),
               "sana_cli": _common.sana_cli_info(), "load_average_at_start": _common.load_average(), "runs": []}
    outputs = {}
    for strategy in strategies:
        out = scratch / f"{strategy.replace(':', '_')}.pt"
        argv_child = [sys.executable, str(HERE / "decode_cpu.py"), "--child", strategy, "--vae", str(vae_dir),
                      "--latents", str(scratch / "latents.pt"), "--out", str(out)]
        print(f"decode_cpu: {strategy} ...", file=sys.stderr, flush=True)
        run = _common.run_child(argv_child, env=_common.child_env(), cwd=str(REPO))
        if run["returncode"] != 0:
            results["runs"].append({"strategy": strategy, "error": run["stderr"].strip().splitlines()[-1:]})
            print(run["stderr"], file=sys.stderr)
            continue
        info = json.loads(run["stdout"].strip().splitlines()[-1])
        info.update(process_peak_rss_bytes=run["peak_rss_bytes"], process_seconds=round(run["seconds"], 1))
        outputs[strategy] = torch.load(out)
        out.unlink()
        results["runs"].append(info)
        print(f"decode_cpu: {strategy}: {info['seconds']} s, +{_common.gib(info['peak_above_baseline_bytes'])}",
              file=sys.stderr, flush=True)
    results["load_average_at_end"] = _common.load_average()
    if "full" in outputs:
        for info in results["runs"]:
            if info.get("strategy") in outputs and info["strategy"] != "full":
                info["vs_full"] = compare(outputs["full"], outputs[info["strategy"]])
    name = args.name or f"decode-cpu_{date:%Y-%m-%d}_{_common.slug(results['device']['cpu'], 32)}_{args.size}"
    results_dir = Path(args.results)
    _common.write_json(results_dir / f"{name}.json", results)
    (results_dir / f"{name}.md").write_text(markdown(results))
    print(results_dir / f"{name}.json")
    return 0 if all("error" not in run for run in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
