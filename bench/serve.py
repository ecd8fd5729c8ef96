"""`sana serve` against fresh processes: what a warm server saves a shell loop, and what batching
concurrent requests gives.

    python bench/serve.py                                   # CPU, tiny model (the committed CPU figures)
    python bench/serve.py --model sana-1600m-1024 --device cuda --steps 20   # full size, on a GPU

(1) `--calls` sequential `sana generate` calls (one image each, seeds 0..N-1): without a server
    (`--no-server`, each process loads the model) and attached to a running `sana serve` (the server's
    start and model load are reported apart, not counted in the loop).
(2) `--clients` concurrent HTTP clients of `--prompts` prompts each against the server's OpenAI
    images endpoint, against one `sana batch` (a fresh process, load included and also reported
    without it) of the same prompts. Images/s of each, and the server's GPU batches from its log
    (how many requests each batch served).

Every process gets its own SANA_CLI_CACHE under the work directory, so a server the user runs is
never touched. Full-size models must be in the Hugging Face cache (the server loads hub models only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import child_env, command_line, cpu_name, load_average, now, slug, versions, write_json  # noqa: E402

SANA = shutil.which("sana", path=os.path.dirname(sys.executable)) or "sana"


def _run(argv, env) -> float:
    started = time.perf_counter()
    process = subprocess.run(argv, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, argv))}\n{process.stderr[-2000:]}")
    return time.perf_counter() - started


class Server:
    def __init__(self, env, model: str, device: str):
        self.lines: list[str] = []
        started = time.perf_counter()
        self.process = subprocess.Popen([SANA, "serve", "--port", "0", "--model", model],
                                        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        while not any("listening on" in line for line in self.lines):
            if self.process.poll() is not None:
                time.sleep(0.2)
                raise SystemExit("sana serve did not start:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        self.start_seconds = time.perf_counter() - started
        line = next(line for line in self.lines if "listening on" in line)
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=120)


def _generate_args(args, prompt: str, seed: int, out: Path) -> list[str]:
    extra = ["--steps", str(args.steps)] if args.steps else []
    extra += ["--size", str(args.size)] if args.size else []
    return [SANA, "generate", prompt, "--model", args.model, "--device", args.device, "--seed", str(seed),
            "-o", f"{out}/", "-q", *extra]


def sequential(args, env, work: Path, server: Server | None) -> float:
    out = work / ("seq-server" if server else "seq-alone")
    total = 0.0
    for seed in range(args.calls):
        argv = _generate_args(args, "a lighthouse at dusk", seed, out)
        total += _run(argv if server else [*argv, "--no-server"], env)
    return total


def concurrent(args, server: Server) -> tuple[float, list[str]]:
    mark = len(server.lines)
    errors: list[str] = []

    def client(number: int) -> None:
        for index in range(args.prompts):
            body = {"prompt": f"prompt {number}-{index}", "model": args.model, "seed": number * 100 + index}
            if args.steps:
                body["steps"] = args.steps
            if args.size:
                body["size"] = f"{args.size}x{args.size}"
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/images/generations",
                                             data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=3600) as answer:
                    json.loads(answer.read())
            except Exception as exc:  # noqa: BLE001 - recorded, the bench fails below
                errors.append(str(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed: {errors[0]}")
    return seconds, [line for line in server.lines[mark:] if re.search(r"GPU batch \d+/\d+", line)]


def one_batch(args, env, work: Path) -> tuple[float, dict]:
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for number in range(args.clients):
            for index in range(args.prompts):
                row = {"prompt": f"prompt {number}-{index}", "seed": number * 100 + index}
                if args.steps:
                    row["steps"] = args.steps
                handle.write(json.dumps(row) + "\n")
    argv = [SANA, "batch", str(prompts), "--model", args.model, "--device", args.device, "-o", str(work / "batch"),
            "--json", "--no-server", "-q", *(["--size", str(args.size)] if args.size else [])]
    started = time.perf_counter()
    process = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"sana batch failed:\n{process.stderr[-2000:]}")
    return seconds, json.loads(process.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (CPU) or a full-size preset in the HF cache")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the model's)")
    parser.add_argument("--calls", type=int, default=10, help="sequential sana generate calls")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per client")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="sana-bench-serve-"))
    env = child_env({"SANA_CLI_CACHE": str(work / "cache")})
    env.pop("SANA_SERVER", None)
    if args.model.startswith("tiny"):  # build it once, outside every timing
        _run([SANA, "generate", "warm-up", "--model", args.model, "--device", args.device, "-o", f"{work}/warm/",
              "-q", "--no-server", "--steps", "1"], env)
    load_before = load_average()
    alone = sequential(args, env, work, None)
    batch_seconds, batch_summary = one_batch(args, env, work)
    server = Server(env, args.model, args.device)
    try:
        attached = sequential(args, env, work, server)
        concurrent_seconds, batch_lines = concurrent(args, server)
    finally:
        server.stop()
    images = args.clients * args.prompts
    served = [int(re.search(r"from (\d+) request", line).group(1)) for line in batch_lines]
    batch_load = batch_summary["timings"].get("load", 0.0)
    result = {
        "date": now().isoformat(timespec="seconds"), "command": command_line(), "machine": cpu_name(),
        "cpu_cores": os.cpu_count(), "device": args.device, "model": args.model, "steps": args.steps,
        "size": args.size, "load_average_before": load_before, "load_average_after": load_average(),
        "versions": versions(),
        "sequential": {"calls": args.calls, "without_server_s": round(alone, 2),
                       "with_server_s": round(attached, 2), "speedup": round(alone / attached, 2),
                       "server_start_and_load_s": round(server.start_seconds, 2)},
        "concurrent": {"clients": args.clients, "prompts_per_client": args.prompts, "images": images,
                       "server_s": round(concurrent_seconds, 2),
                       "server_images_per_s": round(images / concurrent_seconds, 3),
                       "gpu_batches": len(batch_lines), "requests_per_gpu_batch": served,
                       "server_log": batch_lines},
        "one_batch": {"process_s": round(batch_seconds, 2), "images_per_s": round(images / batch_seconds, 3),
                      "load_s": batch_load,
                      "images_per_s_without_load": batch_summary.get("images_per_second")},
    }
    stamp = f"serve_{result['date'][:10]}_{slug(cpu_name() if args.device == 'cpu' else args.device, 24)}_{args.model}"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stamp}.json", result)
    kind = "CPU" if args.device == "cpu" else "GPU"
    seq, con, one = result["sequential"], result["concurrent"], result["one_batch"]
    table = [
        f"# sana serve, {args.model}, {kind} figures ({result['machine']}, {os.cpu_count()} cores)", "",
        f"`{result['command']}` on {result['date']}; load average before {load_before}.", "",
        "| workload | without a server | with `sana serve` | ratio |", "|---|---:|---:|---:|",
        f"| {args.calls} sequential `sana generate` calls | {seq['without_server_s']} s | {seq['with_server_s']} s "
        f"| {seq['speedup']}x |",
        f"| {images} prompts: one `sana batch` vs {args.clients} clients x {args.prompts} | "
        f"{one['images_per_s']} img/s ({one['images_per_s_without_load']} img/s without its {one['load_s']} s load) "
        f"| {con['server_images_per_s']} img/s | {round(con['server_images_per_s'] / one['images_per_s'], 2)}x |",
        "", f"Server start and model load (not in the loop): {seq['server_start_and_load_s']} s.",
        f"The server ran the {images} concurrent requests in {con['gpu_batches']} GPU batches; requests per batch: "
        f"{served}.", "", "Server log:", "", "```", *batch_lines, "```", ""]
    (out / f"{stamp}.md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
