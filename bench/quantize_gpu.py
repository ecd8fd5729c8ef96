"""The GPU workload of `--quantize int8`: a 4096x4096 image of the full-size 4K model within 8 GiB.

    python bench/quantize_gpu.py --checkpoints /tmp/sana-ckpt            # on a CUDA machine; one command

It builds the random-weight 4K checkpoint with make_checkpoints.py if it is missing (about 10 GB, drawn on
the GPU), then runs, each in a fresh `sana generate` process on the GPU:

- `int8`: `--size 4096 --low-memory --quantize int8` (the workload: CPU offload, strip decode, int8 weights);
- `bf16`: the same without `--quantize`, for the memory and the image it is compared with.

It records sana's own `peak_memory_bytes` (torch.cuda.max_memory_allocated over the generation, the load
excluded: with CPU offload the weights reach the GPU only during it) and `peak_reserved_bytes`, the seconds,
and the PSNR of the int8 image against the bf16 one, and exits 1 when the int8 peak is above --budget-gib
(default 8). Results go to bench/results/ named after the GPU. No figures from it are committed yet: it has
not run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common  # noqa: E402

PROMPT = "a cyberpunk cat with a neon sign"
GIB = 2**30


def _generate(model_dir: Path, out: Path, extra: list[str], steps: int) -> dict:
    argv = [sys.executable, "-m", "sana_cli", "generate", PROMPT, "--model", str(model_dir), "--size", "4096",
            "--steps", str(steps), "--seed", "1", "--low-memory", "-o", str(out), "--overwrite", "--json", "-q",
            *extra]
    child = _common.run_child(argv, env=_common.child_env(), timeout=3600)
    if child["returncode"] != 0:
        return {"ok": False, "argv": argv, "stderr": child["stderr"][-3000:]}
    result = json.loads(child["stdout"])
    return {"ok": True, "argv": argv, "seconds": round(child["seconds"], 1),
            "load_seconds": round(result["timings"]["load"], 1), "peak_memory_bytes": result["peak_memory_bytes"],
            "peak_reserved_bytes": result["peak_reserved_bytes"], "decode": result["images"][0]["decode"],
            "dtype": result["model"]["dtype"], "device": result["model"]["device"],
            "process_peak_rss_bytes": child["peak_rss_bytes"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=str(HERE / "checkpoints" / "full"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--skip-bf16", action="store_true", help="run only the int8 workload")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("quantize_gpu: needs a CUDA GPU (the CPU figures are bench/quantize_cpu.py's)", file=sys.stderr)
        return 4
    import make_checkpoints

    model_dir = make_checkpoints.model_dir(args.checkpoints, "4k")
    if not (model_dir / "model_index.json").is_file():
        make_checkpoints.build(args.checkpoints, models=("4k",), scale="full", device="cuda")
    device = _common.describe_device(torch.device("cuda"))
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-gpu-"))
    os.environ.setdefault("SANA_CLI_CACHE", str(work / "cache"))
    data = {"command": _common.command_line(), "date": _common.now().isoformat(), "device": device,
            "versions": _common.versions(), "sana_cli": _common.sana_cli_info(), "checkpoint": str(model_dir),
            "size": "4096x4096", "steps": args.steps, "budget_gib": args.budget_gib}
    data["int8"] = _generate(model_dir, work / "int8.png", ["--quantize", "int8"], args.steps)
    if not args.skip_bf16:
        data["bf16"] = _generate(model_dir, work / "bf16.png", [], args.steps)
        if data["int8"]["ok"] and data["bf16"]["ok"]:
            data["int8_vs_bf16"] = _common.compare_images(work / "bf16.png", work / "int8.png")
    peak = data["int8"].get("peak_memory_bytes")
    data["within_budget"] = peak is not None and peak <= args.budget_gib * GIB
    name = _common.slug(str(device.get("name", "cuda")), 24)
    stem = f"quantize-gpu_{_common.now().date()}_{name}_4096"
    _common.write_json(Path(args.results) / f"{stem}.json", data)
    print(json.dumps({k: v for k, v in data.items() if k in ("int8", "bf16", "int8_vs_bf16", "within_budget")},
                     indent=2))
    return 0 if data["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
