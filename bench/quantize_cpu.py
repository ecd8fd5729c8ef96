"""`--quantize int8` on the CPU: memory of the full-size 1024 transformer and the image difference it causes.

    python bench/quantize_cpu.py                                   # full-size 1024 config, random weights
    python bench/quantize_cpu.py --parts tiny                      # only the tiny-model PSNR (seconds)
    python bench/quantize_cpu.py --checkpoints /tmp/sana-ckpt      # reuse make_checkpoints.py's output

Every measurement runs in a fresh process, so each peak is clean:

- `transformer`: the full-size 1600M transformer (the 1024 model's, make_checkpoints.py --models 1024) loaded
  the way `sana` loads it, in bf16, and with sana-cli's int8 recipe (diffusers' TorchAoConfig with torchao's
  Int8WeightOnlyConfig, then the blocks' 1x1 convolutions as int8 Linear layers). Recorded: the bytes its
  weights hold (quantized weights at their int8 size, scales included), the process's resident set after the
  load and after one forward pass at 512x512 (16x16 latents, one image, a 300-token caption), with its
  anonymous and file-mapped parts (bf16 weights stay memory-mapped from the safetensors file: they count
  once a forward has read them), the process peak (VmHWM), and the seconds of each.
- `image-full`: `sana generate` of the full-size 1024 model on the CPU, bf16 against `--quantize int8`, at
  256x256 for 2 steps (`--force-size`; a 1024x1024 image takes hours on 2 cores), each with its process
  peak RSS (wait4) and the PSNR of the int8 image against the bf16 one.
- `image-tiny`: the tiny model, `--dtype bf16` and the default fp32, each against `--quantize int8`, at
  128x128 for 4 steps: PSNR over 4 seeds.

The weights are random (make_checkpoints.py's recipe), so the PSNR says how much int8 rounding moves this
network's output, not how a trained model's image looks. These are CPU figures; the GPU workload is
`bench/quantize_gpu.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402

PARTS = ("transformer", "image-full", "image-tiny")
PROMPT = "a cyberpunk cat with a neon sign"


def _status() -> dict:
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def child_transformer(model_dir: str, mode: str) -> dict:
    """Load the full-size transformer (bf16 or int8, as sana-cli does) and run one forward pass."""
    import gc

    import torch
    from diffusers import SanaTransformer2DModel

    from sana_cli.engine import quantize as quantizing
    from sana_cli.engine.loading import quiet_backend_imports

    quiet_backend_imports()
    kwargs = {}
    if mode == "int8":
        kwargs["quantization_config"] = quantizing.pipeline_config("int8", torch.bfloat16).quant_mapping["transformer"]
    started = time.perf_counter()
    with quantizing.compact_heap(active=mode == "int8"):  # as pipeline.load does around a quantizing load
        transformer = SanaTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", variant="bf16",
                                                             dtype=torch.bfloat16, **kwargs)
        if mode == "int8":
            quantizing.finish(types.SimpleNamespace(transformer=transformer), "int8")
    gc.collect()
    load_seconds = time.perf_counter() - started
    after_load = _status()
    quantized = quantizing.quantized_modules(transformer)
    linear = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 32, 16, 16, generator=generator).to(torch.bfloat16)
    caption = (torch.randn(1, 300, 2304, generator=generator) * 0.1).to(torch.bfloat16)
    started = time.perf_counter()
    with torch.no_grad():
        out = transformer(latents, encoder_hidden_states=caption, timestep=torch.tensor([500.0]),
                          return_dict=False)[0]
    forward_seconds = time.perf_counter() - started
    return {"mode": mode, "weights_bytes": quantizing.module_bytes(transformer),
            "parameters": sum(p.numel() for p in transformer.parameters()),
            "quantized_modules": len(quantized), "weight_types": sorted(set(quantized.values())),
            "linear_layers": len(linear), "linear_not_quantized": [n for n in linear if n not in quantized][:8],
            "load_seconds": round(load_seconds, 1), "after_load": after_load,
            "forward_seconds": round(forward_seconds, 1), "after_forward": _status(),
            "output_abs_mean": float(out.float().abs().mean())}


def run_transformer(model_dir: Path, work: Path) -> dict:
    results = {}
    for mode in ("bf16", "int8"):
        child = _common.run_child([sys.executable, __file__, "--child-transformer", str(model_dir), mode],
                                  env=_common.child_env(), timeout=3600)
        if child["returncode"] != 0:
            raise SystemExit(f"transformer {mode} failed:\n{child['stderr'][-3000:]}")
        results[mode] = {**json.loads(child["stdout"].strip().splitlines()[-1]),
                         "process_peak_rss_bytes": child["peak_rss_bytes"], "seconds": round(child["seconds"], 1)}
    results["weights_ratio"] = round(results["int8"]["weights_bytes"] / results["bf16"]["weights_bytes"], 3)
    return results


def _generate(model: str, out: Path, extra: list[str], seed: int, size: int, steps: int) -> dict:
    argv = [sys.executable, "-m", "sana_cli", "generate", PROMPT, "--model", model, "--size", str(size),
            "--steps", str(steps), "--seed", str(seed), "-o", str(out), "--overwrite", "--json", "-q", *extra]
    child = _common.run_child(argv, env=_common.child_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                              "2")}), timeout=7200)
    if child["returncode"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{child['stderr'][-3000:]}")
    result = json.loads(child["stdout"])
    return {"seconds": round(child["seconds"], 1), "load_seconds": round(result["timings"]["load"], 1),
            "process_peak_rss_bytes": child["peak_rss_bytes"], "dtype": result["model"]["dtype"]}


def run_image_full(model_dir: Path, work: Path, size: int, steps: int) -> dict:
    common = ["--device", "cpu", "--dtype", "bf16", "--force-size", "--guidance", "4.5"]
    bf16 = _generate(str(model_dir), work / "full-bf16.png", common, 1, size, steps)
    int8 = _generate(str(model_dir), work / "full-int8.png", common + ["--quantize", "int8"], 1, size, steps)
    return {"size": f"{size}x{size}", "steps": steps, "seed": 1, "bf16": bf16, "int8": int8,
            "peak_ratio": round(int8["process_peak_rss_bytes"] / bf16["process_peak_rss_bytes"], 3),
            "int8_vs_bf16": _common.compare_images(work / "full-bf16.png", work / "full-int8.png")}


def run_image_tiny(work: Path) -> dict:
    results = {}
    for dtype in ("bf16", "fp32"):
        comparisons = []
        for seed in range(4):
            base = work / f"tiny-{dtype}-{seed}.png"
            quantized = work / f"tiny-{dtype}-int8-{seed}.png"
            common = ["--dtype", dtype, "--device", "cpu"]
            _generate("tiny", base, common, seed, 128, 4)
            _generate("tiny", quantized, common + ["--quantize", "int8"], seed, 128, 4)
            comparisons.append(_common.compare_images(base, quantized))
        psnrs = [c["psnr_db"] for c in comparisons if c["psnr_db"] is not None]
        results[dtype] = {"size": "128x128", "steps": 4, "seeds": [0, 1, 2, 3],
                          "int8_vs_unquantized": _common.combine_comparisons(comparisons),
                          "psnr_db_mean": round(sum(psnrs) / len(psnrs), 3) if psnrs else None, "each": comparisons}
    return results


def markdown(data: dict) -> str:
    gib = _common.gib
    lines = [f"# `--quantize int8` on the CPU ({data['machine']['cpu']}, {data['machine']['cores']} cores): "
             "CPU figures, random weights", "",
             f"- command: `{data['command']}`", f"- date: {data['date']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in data['versions'].items() if v)}",
             f"- load average at start / end: {data['load_average']['start']} / {data['load_average']['end']}",
             f"- checkpoint: {data.get('checkpoint')}", ""]
    part = data.get("transformer")
    if part:
        bf16, int8 = part["bf16"], part["int8"]
        lines += ["## The full-size 1600M transformer (1024 config), loaded as sana-cli loads it", "",
                  "| | bf16 | int8 | int8 / bf16 |", "|---|---:|---:|---:|",
                  f"| weights as stored | {gib(bf16['weights_bytes'])} | {gib(int8['weights_bytes'])} | "
                  f"**{part['weights_ratio']}** |"]
        for label, key, field in (("resident after load (VmRSS)", "after_load", "VmRSS"),
                                  ("resident after one forward (VmRSS)", "after_forward", "VmRSS"),
                                  ("anonymous part of it (RssAnon)", "after_forward", "RssAnon"),
                                  ("file-mapped part of it (RssFile)", "after_forward", "RssFile"),
                                  ("process peak RSS, load and forward (VmHWM)", "after_forward", "VmHWM")):
            a, b = bf16[key][field], int8[key][field]
            lines.append(f"| {label} | {gib(a)} | {gib(b)} | {b / a:.2f} |")
        lines += [f"| load seconds | {bf16['load_seconds']} | {int8['load_seconds']} | |",
                  f"| one forward, 16x16 latents, seconds | {bf16['forward_seconds']} | {int8['forward_seconds']} | |",
                  "", f"int8: {int8['quantized_modules']} modules with {', '.join(int8['weight_types'])} weights "
                  f"(every Linear layer, {int8['linear_layers']} of them, and the blocks' 1x1 convolutions); "
                  "the depthwise 3x3 convolutions, norms, embeddings and biases stay bf16.", ""]
    part = data.get("image-full")
    if part:
        lines += [f"## The full-size 1024 model, `sana generate --device cpu --dtype bf16` at {part['size']}, "
                  f"{part['steps']} steps", "",
                  "| | process peak RSS | seconds (load) |", "|---|---:|---:|",
                  f"| bf16 | {gib(part['bf16']['process_peak_rss_bytes'])} | {part['bf16']['seconds']} "
                  f"({part['bf16']['load_seconds']}) |",
                  f"| --quantize int8 | {gib(part['int8']['process_peak_rss_bytes'])} | {part['int8']['seconds']} "
                  f"({part['int8']['load_seconds']}) |", "",
                  f"Peak ratio {part['peak_ratio']}; int8 image vs bf16: PSNR {part['int8_vs_bf16']['psnr_db']} dB, "
                  f"max difference {part['int8_vs_bf16']['max_abs_diff']} levels.", ""]
    part = data.get("image-tiny")
    if part:
        lines += ["## The tiny model at 128x128, 4 steps, seeds 0-3", "", "| compute dtype | PSNR int8 vs unquantized "
                  "(min / mean) | max difference |", "|---|---:|---:|"]
        for dtype, entry in part.items():
            combined = entry["int8_vs_unquantized"]
            lines.append(f"| {dtype} | {combined.get('psnr_db')} / {entry['psnr_db_mean']} dB | "
                         f"{combined.get('max_abs_diff')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=str(HERE / "checkpoints" / "full"),
                        help="make_checkpoints.py output (the 1024 model is built there if missing)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    parser.add_argument("--size", type=int, default=256, help="image-full size (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="image-full steps (default 2)")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--child-transformer", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_transformer:
        print(json.dumps(child_transformer(*args.child_transformer)))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    data = {"command": _common.command_line(), "date": _common.now().isoformat(),
            "machine": {"cpu": _common.cpu_name(), "cores": os.cpu_count(),
                        "memory_bytes": _common.memory_total_bytes()},
            "versions": {**_common.versions(), "torchao": _torchao_version()}, "sana_cli": _common.sana_cli_info(),
            "load_average": {"start": _common.load_average()}, "figures": "CPU"}
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    os.environ.setdefault("SANA_CLI_CACHE", str(work / "cache"))
    if {"transformer", "image-full"} & set(parts):
        import make_checkpoints

        model_dir = make_checkpoints.model_dir(args.checkpoints, "1024")
        if not (model_dir / "model_index.json").is_file():
            make_checkpoints.build(args.checkpoints, models=("1024",), scale="full")
        data["checkpoint"] = str(model_dir)
    for part in parts:
        print(f"quantize_cpu: {part} ...", file=sys.stderr, flush=True)
        if part == "transformer":
            data[part] = run_transformer(model_dir, work)
        elif part == "image-full":
            data[part] = run_image_full(model_dir, work, args.size, args.steps)
        else:
            data[part] = run_image_tiny(work)
    data["load_average"]["end"] = _common.load_average()
    results = Path(args.results)
    stem = f"quantize-cpu_{_common.now().date()}_{_common.slug(data['machine']['cpu'], 16)}_{'-'.join(parts)}"
    _common.write_json(results / f"{stem}.json", data)
    (results / f"{stem}.md").write_text(markdown(data) + "\n")
    print(results / f"{stem}.md")
    return 0


def _torchao_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
