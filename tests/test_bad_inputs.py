"""Every bad input gets one clear line and its documented exit code, through the installed `sana`.

CASES is the table in the README ("Bad input and what sana says"): a test checks that the two agree,
so the documentation cannot drift from the behaviour.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import SANA, limited, one_line_error, run_sana

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass
class Case:
    name: str  # the README's "input" column
    args: list  # placeholders: {tmp} a fresh temp dir, {tiny} the tiny model dir, {files} prepared inputs
    code: int
    says: str  # a fragment of the single stderr error line (or of a warning, for exit 0)
    stdin: str | None = None
    env: dict = field(default_factory=dict)
    limit_file_size: int | None = None
    limit_memory: int | None = None  # address-space cap in bytes: a real out-of-memory


CASES = [
    Case("empty prompt", ["generate", "", "--model", "tiny"], 2, "the prompt is empty"),
    Case("whitespace-only prompt", ["generate", " \t ", "--model", "tiny"], 2, "the prompt is empty"),
    Case("prompt longer than the text encoder reads",
         ["generate", "{long_prompt}", "--model", "tiny", "--seed", "1", "-o", "{tmp}/long.png"], 0,
         "the text encoder reads the first 298"),
    Case("size not a multiple of 32", ["generate", "a cat", "--size", "1000"], 2,
         "--size 1000 is not a multiple of 32 (try 992 or 1024)"),
    Case("size zero", ["generate", "a cat", "--size", "0"], 2, "--size must be positive"),
    Case("batch --size not a multiple of 32", ["batch", "{files}/ok.txt", "--model", "tiny", "--size", "33"], 2,
         "--size 33 is not a multiple of 32"),
    Case("row 'size' not a multiple of 32", ["batch", "{files}/size-row.jsonl", "--model", "tiny"], 2,
         "line 1: 'size' 100 is not a multiple of 32 (try 96 or 128)"),
    Case("negative size", ["generate", "a cat", "--width", "-64", "--height", "64"], 2, "must be positive"),
    Case("non-numeric size", ["generate", "a cat", "--size", "big"], 2, "'big' is not a valid integer"),
    Case("absurdly large side", ["generate", "a cat", "--size", "65536"], 2, "is outside 32..8192"),
    Case("more pixels than any model renders", ["generate", "a cat", "--model", "sana-4k", "--size", "8192"], 2,
         "more than the 4096x4096 pixels"),
    Case("aspect ratio beyond 1:4", ["generate", "a cat", "--model", "sana-4k", "-W", "1024", "-H", "8192"], 2,
         "outside 1:4..4:1"),
    Case("size far from the model's scale", ["generate", "a cat", "--model", "sana-4k", "--size", "1024"], 2,
         "use --model sana-1600m-1024 for this size, or --force-size"),
    Case("zero steps", ["generate", "a cat", "--steps", "0"], 2, "steps must be at least 1"),
    Case("negative steps", ["generate", "a cat", "--steps", "-5"], 2, "steps must be at least 1"),
    Case("negative guidance", ["generate", "a cat", "--guidance", "-1"], 2, "guidance must be 0 or more"),
    Case("Sprint with more than 4 steps", ["generate", "a cat", "--model", "sprint", "--steps", "8"], 2,
         "sprint takes 1-4 steps"),
    Case("PAG on a model that cannot do PAG", ["generate", "a cat", "--model", "sprint", "--pag-scale", "2"], 2,
         "sprint cannot use PAG"),
    Case("negative prompt on SANA-Sprint", ["generate", "a cat", "--model", "sprint", "--negative-prompt", "blur"],
         2, "has no negative prompt"),
    Case("unknown preset", ["generate", "a cat", "--model", "sana-4kk"], 2, "did you mean 'sana-4k'?"),
    Case("model directory that does not exist", ["generate", "a cat", "--model", "{tmp}/no-such-model"], 4,
         "does not exist"),
    Case("directory without model_index.json", ["generate", "a cat", "--model", "{files}/not-a-model"], 2,
         "has no model_index.json"),
    Case("truncated safetensors file", ["generate", "a cat", "--model", "{files}/corrupt", "-o", "{tmp}/"], 4,
         "are corrupt or truncated"),
    Case("only pickle .bin weights", ["generate", "a cat", "--model", "{files}/pickle", "-o", "{tmp}/"], 4,
         "does not load pickle files by default (--allow-pickle"),
    Case("model repo that wants custom code", ["generate", "a cat", "--model", "{files}/custom-code"], 2,
         "never runs code from a model repository"),
    Case("offline, model not in the cache", ["generate", "a cat", "--model", "someone/uncached-sana", "--offline",
                                             "--device", "cpu", "--size", "128"], 4,
         "not in the Hugging Face cache and offline mode is on"),
    # Online (a closed port stands in for the hub): the GPU is what is missing. Offline, the missing cache is.
    Case("real model without CUDA", ["generate", "a cat", "--model", "sana-1600m-1024", "-o", "{tmp}/"], 4,
         "needs a CUDA GPU and none is available", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("--device cuda without CUDA", ["generate", "a cat", "--model", "tiny", "--device", "cuda", "-o", "{tmp}/"],
         4, "CUDA is not available"),
    Case("--fp8 without a CUDA GPU", ["generate", "a cat", "--model", "tiny", "--fp8", "-o", "{tmp}/"], 4,
         "--fp8 needs a CUDA GPU"),
    # What a load would refuse (no CUDA, no GPU for --fp8 or nf4, a model not cached offline) is decided
    # before the run makes its output directory or manifest: a refused run leaves the disk as it was.
    Case("--device cuda without CUDA, batch into a new directory",
         ["batch", "{files}/ok.txt", "--model", "tiny", "--device", "cuda", "-o", "{tmp}/new/"], 4,
         "CUDA is not available"),
    Case("--quantize nf4 without a GPU, batch into a new directory",
         ["batch", "{files}/ok.txt", "--model", "tiny", "--quantize", "nf4", "-o", "{tmp}/new/"], 4,
         "--quantize nf4 needs a CUDA GPU"),
    Case("--fp8 without a GPU, batch into a new directory",
         ["batch", "{files}/ok.txt", "--model", "tiny", "--fp8", "-o", "{tmp}/new/"], 4, "--fp8 needs a CUDA GPU"),
    Case("--device cuda without CUDA, generate into a new directory",
         ["generate", "a cat", "--model", "tiny", "--device", "cuda", "-o", "{tmp}/new/sub/"], 4,
         "CUDA is not available"),
    Case("real model without CUDA, generate into a new directory",
         ["generate", "a cat", "--model", "sana-1600m-1024", "-o", "{tmp}/new/"], 4,
         "needs a CUDA GPU and none is available", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("--device cuda without CUDA, sana decode into a new directory",
         ["decode", "{files}/latents/good.latents.safetensors", "--device", "cuda", "-o", "{tmp}/new/"], 4,
         "CUDA is not available"),
    Case("offline without CUDA, model not in the cache",
         ["generate", "a cat", "--model", "sana-1600m-1024", "--offline", "-o", "{tmp}/new/"], 4,
         "sana-1600m-1024 is not in the Hugging Face cache and offline mode is on"),
    Case("output directory that cannot be created", ["generate", "a cat", "--model", "tiny", "-o",
                                                     "{files}/a-file/sub/"], 2, "a file is in the way"),
    Case("output file that exists", ["generate", "a cat", "--model", "tiny", "-o", "{files}/taken.png"], 2,
         "already exists (pass --overwrite"),
    Case("unsupported image extension", ["generate", "a cat", "-o", "{tmp}/cat.gif"], 2,
         "cannot write '.gif' images (use .png, .jpg or .webp)"),
    Case("disk full while writing", ["generate", "a cat", "--model", "tiny", "--seed", "1", "-o", "{tmp}/full.png"],
         1, "cannot write", limit_file_size=4000),
    Case("out of memory", ["generate", "a cat", "--model", "tiny", "--size", "4096", "--force-size", "--steps", "1",
                           "-o", "{tmp}/"], 1, "out of memory; try --decode strips", limit_memory=2 * 2**30),
    Case("out of memory in one batch row", ["batch", "{files}/one-huge.jsonl", "--model", "tiny", "--force-size",
                                            "--steps", "1", "-o", "{tmp}/oom"], 3,
         "1 image(s) failed (line(s) 2): out of memory", limit_memory=2 * 2**30),
    Case("empty batch file", ["batch", "{files}/empty.txt", "--model", "tiny"], 2, "has no prompts"),
    Case("binary batch file", ["batch", "{files}/binary.txt", "--model", "tiny"], 2, "is a binary file"),
    Case("batch file not UTF-8", ["batch", "{files}/latin1.txt", "--model", "tiny"], 2,
         "is not UTF-8 (first bad byte on line 2)"),
    Case("bad JSON line", ["batch", "{files}/bad.jsonl", "--model", "tiny"], 2, "line 2: not valid JSON"),
    Case("CSV without a prompt column", ["batch", "{files}/noprompt.csv", "--model", "tiny"], 2,
         "has no 'prompt' column"),
    Case("unknown field", ["batch", "{files}/unknown.jsonl", "--model", "tiny"], 2,
         "line 1: unknown field(s) 'colour'"),
    Case("wrong type", ["batch", "{files}/types.jsonl", "--model", "tiny"], 2,
         "line 1: 'steps' must be a whole number, got 'many'"),
    Case("duplicate names", ["batch", "{files}/dupes.jsonl", "--model", "tiny"], 2,
         "line 2: name 'Cat' is already used on line 1"),
    Case("name escaping the output directory", ["batch", "{files}/escape.jsonl", "--model", "tiny"], 2,
         "line 1: 'name' '../../x' may not contain path separators"),
    Case("absolute path as a name", ["batch", "{files}/absolute.jsonl", "--model", "tiny"], 2,
         "line 1: 'name' '/etc/cron.d/x' may not contain path separators"),
    Case("batch file that does not exist", ["batch", "{tmp}/missing.txt"], 2, "missing.txt: no such file"),
    Case("--shard 3/2", ["batch", "{files}/ok.txt", "--shard", "3/2"], 2, "I in 0..N-1"),
    Case("--shard 0/0", ["batch", "{files}/ok.txt", "--shard", "0/0"], 2, "N must be at least 1"),
    Case("--size with --width", ["generate", "a cat", "--size", "1024", "--width", "512"], 2,
         "--size conflicts with --width/--height"),
    Case("--pag-layers without --pag-scale", ["generate", "a cat", "--pag-layers", "transformer_blocks.8"], 2,
         "--pag-layers needs --pag-scale above 0"),
    # PAG layers are checked while planning against the model's config, by diffusers' own matching rule.
    Case("--pag-layers that is not a valid pattern", ["generate", "a cat", "--model", "tiny", "--pag-scale", "2",
                                                      "--pag-layers", "[", "-o", "{tmp}/new/"], 2,
         "--pag-layers '[' is not a valid pattern"),
    Case("--pag-layers naming no layer of the model", ["generate", "a cat", "--model", "tiny", "--pag-scale", "2",
                                                       "--pag-layers", "transformer_blocks.8", "-o", "{tmp}/new/"], 2,
         "--pag-layers 'transformer_blocks.8' matches no self-attention layer of tiny"),
    Case("--pag-layers of only commas", ["batch", "{files}/ok.txt", "--model", "tiny", "--pag-scale", "2",
                                         "--pag-layers", ",", "-o", "{tmp}/new/"], 2,
         "--pag-layers ',' names no layer"),
    Case("unknown option", ["generate", "a cat", "--colour", "red"], 2, "No such option '--colour'"),
    Case("unknown command", ["paint", "a cat"], 2, "No such command 'paint'"),
    Case("sana info on a file that is not an image", ["info", "{files}/ok.txt"], 2, "is not a readable image"),
    Case("emoji, Chinese and quotes in a prompt", ["generate", 'a "cute" 🐼 熊猫 eating 🎋, it\'s ink', "--model",
                                                    "tiny", "--seed", "3", "-o", "{tmp}/"], 0, ""),
    Case("newlines in a JSONL prompt", ["batch", "{files}/newline.jsonl", "--model", "tiny", "-o", "{tmp}/nl"], 0, ""),
    Case("very long prompt becomes a short file name", ["generate", "{long_prompt}", "--model", "tiny", "--seed", "5",
                                                        "-o", "{tmp}/"], 0, ""),
    # Files sana-cli did not write: only PNG/JPEG/WebP regular files are opened, bounded, never decoded for
    # metadata; FIFOs and devices are refused before a byte is read.
    Case("PostScript file named .png given to sana info", ["info", "{files}/postscript.png"], 2,
         "is not a readable image: not a PNG, JPEG or WebP file"),
    Case("FIFO given to sana info", ["info", "{files}/fifo.png"], 2, "is a FIFO, not a regular file"),
    Case("link to /dev/zero given to sana info", ["info", "{files}/zero.png"], 2,
         "is a character device, not a regular file", limit_memory=2**30),
    Case("decompression bomb given to sana info", ["info", "{files}/bomb.png"], 2,
         "is too large to be an image sana-cli wrote"),
    Case("image without generation metadata", ["info", "{files}/plain.png"], 2, "has no generation metadata"),
    Case("file named .mp4 that is not a video given to sana info", ["info", "{files}/garbage.mp4"], 2,
         "is not a readable video"),
    Case("FIFO named .mp4 given to sana info", ["info", "{files}/fifo.mp4"], 2, "is a FIFO, not a regular file"),
    Case("link to /dev/zero named .webm given to sana info", ["info", "{files}/zero.webm"], 2,
         "is a character device, not a regular file", limit_memory=2**30),
    Case("video without generation metadata", ["info", "{files}/plain.mp4"], 2, "has no generation metadata"),
    Case("--command on an image without sana metadata", ["info", "{files}/params-only.png", "--command"], 2,
         "has no sana metadata to rebuild a command from"),
    Case("--command on metadata without a model", ["info", "{files}/no-model.png", "--command"], 2,
         "names no model, so no command can reproduce it"),
    Case("--command on a malformed metadata value", ["info", "{files}/bad-steps.png", "--command"], 2,
         "has an invalid 'steps' (expected a whole number)"),
    Case("model_index.json that is a FIFO", ["generate", "a cat", "--model", "{files}/fifo-model"], 2,
         "is a FIFO, not a regular file"),
    Case("model config linked to /dev/zero", ["generate", "a cat", "--model", "{files}/zero-model"], 2,
         "which is not a regular file", limit_memory=2**30),
    Case("output path that is a FIFO", ["generate", "a cat", "--model", "tiny", "-o", "{files}/fifo-out.png"], 2,
         "already exists (pass --overwrite"),
    Case("row name with a right-to-left override", ["batch", "{files}/rtl.jsonl", "--model", "tiny"], 2,
         "may not contain invisible or direction-changing characters"),
    Case("row name with a zero-width space", ["batch", "{files}/zwsp.jsonl", "--model", "tiny"], 2,
         "may not contain invisible or direction-changing characters"),
    Case("hub id with shell characters", ["generate", "a cat", "--model", "org/x;id"], 2, "is not a hub id"),
    Case("--fp8 on an fp16 checkpoint", ["generate", "a cat", "--model", "sana-600m-1024", "--fp8", "--device", "cpu",
                                         "-o", "{tmp}/"], 2, "--fp8 needs the transformer in bf16"),
    Case("--fp8 with --dtype fp16",
         ["generate", "a cat", "--model", "tiny", "--fp8", "--dtype", "fp16", "-o", "{tmp}/"], 2,
         "--fp8 needs the transformer in bf16"),
    Case("--max-memory 0", ["generate", "a cat", "--model", "tiny", "--max-memory", "0", "-o", "{tmp}/"], 2,
         "0.0 is not in the range x>0"),
    Case("sana decode on a file that is not kept latents", ["decode", "{files}/ok.txt"], 2,
         "is not a sana latents file"),
    Case("sana decode of a CUDA run's latents where there is no CUDA",
         ["decode", "{files}/gpu-run.latents.safetensors"], 4, "--device cuda was asked for but CUDA is not available"),
    # A latents file is untrusted input like an image: its header, metadata and shape are checked before a
    # byte of the tensor is read, and against the VAE before anything is decoded. Each file below is a real
    # kept latents file with one thing changed.
    Case("latents whose metadata is not JSON", ["decode", "{files}/latents/meta-not-json.latents.safetensors"], 2,
         "is not a sana latents file (its metadata is not JSON"),
    Case("latents whose metadata names no model", ["decode", "{files}/latents/no-model.latents.safetensors"], 2,
         "(its metadata names no model"),
    Case("latents naming an image in another directory",
         ["decode", "{files}/latents/slash-name.latents.safetensors"], 2,
         "its image name '../escaped.png' is not a plain .png, .jpg or .webp file name"),
    Case("latents naming an image with a NUL", ["decode", "{files}/latents/nul-name.latents.safetensors"], 2,
         "is not a plain .png, .jpg or .webp file name"),
    Case("latents recording a bad device", ["decode", "{files}/latents/bad-device.latents.safetensors"], 2,
         "its metadata records the device 'gpu; rm -rf ~'"),
    Case("latents of the wrong rank", ["decode", "{files}/latents/rank3.latents.safetensors"], 2,
         "not one image's (1, C, h, w) in a float dtype"),
    Case("latents with more tensors than one", ["decode", "{files}/latents/extra.latents.safetensors"], 2,
         "not one tensor 'latents'"),
    Case("latents whose shape disagrees with their metadata",
         ["decode", "{files}/latents/wide.latents.safetensors"], 2,
         "its latents are 2600x8, which no VAE decodes into the 128x128 its metadata records"),
    Case("latents whose metadata size is beyond generate's limits",
         ["decode", "{files}/latents/huge-size.latents.safetensors"], 2, "its metadata: width 16384 is outside"),
    Case("latents with the wrong channel count for the VAE",
         ["decode", "{files}/latents/channels.latents.safetensors"], 2,
         "the latents (8 channels, 32x32) do not fit the VAE of"),
    # Manifests: only sana-cli's own, never through a link; numbers: finite, in documented ranges;
    # lines end only at \n; questionable inputs decided; usage and environment errors before torch.
    Case("manifest that is a directory", ["batch", "{files}/ok.txt", "--model", "tiny", "-o", "{files}/manifest-dir"],
         2, "results.jsonl is a directory, not a sana-cli manifest"),
    Case("manifest that is a dangling symbolic link", ["batch", "{files}/ok.txt", "--model", "tiny", "-o",
                                                       "{files}/manifest-dangling"], 2, "is a symbolic link"),
    Case("manifest that links out of the output directory", ["batch", "{files}/ok.txt", "--model", "tiny", "-o",
                                                             "{files}/manifest-link"], 2, "is a symbolic link"),
    Case("results.jsonl that sana-cli did not write", ["batch", "{files}/ok.txt", "--model", "tiny", "-o",
                                                       "{files}/manifest-foreign"], 2, "was not written by sana-cli"),
    Case("infinite guidance", ["generate", "a cat", "--model", "tiny", "--guidance", "inf"], 2,
         "'inf' is not a finite number"),
    Case("NaN guidance", ["generate", "a cat", "--model", "tiny", "--guidance", "nan"], 2,
         "'nan' is not a finite number"),
    Case("absurd guidance", ["generate", "a cat", "--model", "tiny", "--guidance", "1e9"], 2,
         "guidance must be at most 30"),
    Case("infinite PAG scale", ["generate", "a cat", "--model", "tiny", "--pag-scale", "inf"], 2,
         "'inf' is not a finite number"),
    # No option of any command takes NaN or infinity (NaN passes any range check): one float type for all.
    Case("NaN --batch-window for sana serve", ["serve", "--batch-window", "nan"], 2,
         "Invalid value for '--batch-window': 'nan' is not a finite number"),
    Case("NaN --max-memory for sana serve", ["serve", "--max-memory", "nan"], 2,
         "Invalid value for '--max-memory': 'nan' is not a finite number"),
    Case("NaN --max-memory for a batch into a new directory", ["batch", "{files}/ok.txt", "--model", "tiny",
                                                               "--max-memory", "nan", "-o", "{tmp}/new/"], 2,
         "'nan' is not a finite number"),
    Case("infinite SANA_MAX_MEMORY", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/new/"], 2,
         "'inf' is not a finite number", env={"SANA_MAX_MEMORY": "inf"}),
    Case("--max-memory 1e999 for sana decode", ["decode", "{files}/ok.txt", "--max-memory", "1e999"], 2,
         "'1e999' is not a finite number"),
    Case("NaN --control-scale", ["generate", "a cat", "--model", "tiny", "--controlnet", "tiny-controlnet",
                                 "--control-image", "{files}/input.png", "--control-scale", "nan"], 2,
         "'nan' is not a finite number"),
    Case("infinite --strength", ["generate", "a cat", "--model", "tiny-sprint", "--image", "{files}/input.png",
                                 "--strength", "-inf"], 2, "'-inf' is not a finite number"),
    Case("--keep-alive of 400 digits", ["serve", "--keep-alive", "9" * 400 + "s"], 2, "is more than ten years"),
    Case("infinite guidance in a batch row", ["batch", "{files}/inf-guidance.jsonl", "--model", "tiny"], 2,
         "line 1: 'guidance' must be a finite number"),
    Case("absurd guidance in a batch row", ["batch", "{files}/huge-guidance.jsonl", "--model", "tiny"], 2,
         "line 1: guidance must be at most 30"),
    Case("seed beyond 2^63 in a batch row", ["batch", "{files}/huge-seed.jsonl", "--model", "tiny"], 2,
         "line 1: seed must be a whole number in 0..2^63-1"),
    Case("negative batch base seed", ["batch", "{files}/ok.txt", "--model", "tiny", "--seed", "-1"], 2,
         "--seed must be a whole number in 0..2^63-1"),
    Case("--batch-size 0", ["generate", "a cat", "--model", "tiny", "--batch-size", "0"], 2,
         "--batch-size must be a whole number in 1..256, got 0"),
    Case("absurd --num-images", ["generate", "a cat", "--model", "tiny", "-n", "100000"], 2,
         "--num-images must be a whole number in 1..10000"),
    Case("prompt on stdin larger than 1 MiB", ["generate", "-", "--model", "tiny"], 2, "larger than 1 MiB",
         stdin="a cat " * 200_000),
    Case("JSONL with U+2028 and other separators inside strings", ["batch", "{files}/separators.jsonl", "--model",
                                                                   "tiny", "-o", "{tmp}/sep"], 0, ""),
    Case("text file with form feeds and U+2028 inside lines", ["batch", "{files}/separators.txt", "--model", "tiny",
                                                               "-o", "{tmp}/septxt"], 0, ""),
    Case("UTF-16 batch file with a byte-order mark", ["batch", "{files}/utf16.txt", "--model", "tiny", "-o",
                                                      "{tmp}/u16"], 0, ""),
    Case("UTF-16 batch file without a byte-order mark", ["batch", "{files}/utf16-nobom.txt", "--model", "tiny"], 2,
         "looks like UTF-16 without a byte-order mark"),
    Case("field repeated in a JSONL row", ["batch", "{files}/repeated.jsonl", "--model", "tiny"], 2,
         "line 1: field 'seed' appears twice"),
    Case("column repeated in a CSV header", ["batch", "{files}/repeated.csv", "--model", "tiny"], 2,
         "the CSV header repeats column(s) 'seed'"),
    Case("bare carriage return in a CSV cell", ["batch", "{files}/carriage-return.csv", "--model", "tiny"], 2,
         "line 3: not valid CSV"),
    Case("names that differ only by surrounding spaces", ["batch", "{files}/spaced-names.jsonl", "--model", "tiny"], 2,
         "line 2: name ' cat ' is already used on line 1"),
    Case("prompt of only invisible characters", ["generate", "\u200b\u2060\u3164", "--model", "tiny"], 2,
         "the prompt is empty (it has only invisible characters)"),
    Case("-o .png", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/.png"], 2,
         "has an extension but no file name"),
    Case("prompt that is not UTF-8", ["generate", "caf\udce9", "--model", "tiny"], 2,
         "the prompt is not valid UTF-8"),
    Case("--device with a bad value", ["generate", "a cat", "--model", "tiny", "--device", "gpu", "-o", "{tmp}/"], 2,
         "unsupported --device 'gpu'"),
    Case("cache directory that is a file", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 4,
         "a-file is not a directory", env={"SANA_CLI_CACHE": "{files}/a-file/cache"}),
    Case("garbage SANA_PROGRESS_INTERVAL", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "SANA_PROGRESS_INTERVAL must be a number of seconds", env={"SANA_PROGRESS_INTERVAL": "soon"}),
    Case("more images than one batch run makes", ["batch", "{files}/million.jsonl", "--model", "tiny"], 2,
         "one run makes at most 1000000"),
    Case("garbage yes/no SANA_ variable", ["generate", "a cat", "--model", "tiny", "--dry-run"], 2,
         "SANA_GENERATE_OVERWRITE='maybe' is not a yes/no value", env={"SANA_GENERATE_OVERWRITE": "maybe"}),
    # A closed port on the loopback stands in for a hub that cannot be reached (no network, DNS, firewall).
    Case("hub unreachable, model not in the cache", ["generate", "a cat", "--model", "sana-1600m-1024", "--device",
                                                     "cpu", "-o", "{tmp}/"], 4,
         "is not fully in the Hugging Face cache and the hub cannot be reached",
         env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    # LoRA, ControlNet and image-to-image inputs: all checked while planning, before torch is imported.
    Case("LoRA file that does not exist", ["generate", "a cat", "--model", "tiny", "--lora", "{tmp}/no.safetensors",
                                           "-o", "{tmp}/"], 2, "no such file or directory"),
    Case("LoRA that is a pickle file", ["generate", "a cat", "--model", "tiny", "--lora", "{files}/lora.bin", "-o",
                                        "{tmp}/"], 2, "is a pickle file; sana-cli loads LoRAs from .safetensors only"),
    Case("LoRA that is not a safetensors file", ["generate", "a cat", "--model", "tiny", "--lora",
                                                 "{files}/not-a-lora.safetensors", "-o", "{tmp}/"], 2,
         "is not a readable safetensors file"),
    # A LoRA header is parsed and checked whole under one guard: every field of every entry, not just its JSON.
    Case("LoRA header with non-numeric data_offsets", ["generate", "a cat", "--model", "tiny", "--lora",
                                                        "{files}/lora-offsets-text.safetensors", "-o", "{tmp}/"], 2,
         "is not a readable safetensors file ('transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' has "
         "data_offsets that are not [begin, end])"),
    Case("LoRA header with a non-numeric shape", ["generate", "a cat", "--model", "tiny", "--lora",
                                                  "{files}/lora-shape-text.safetensors", "-o", "{tmp}/"], 2,
         "has a shape that is not a list of whole numbers"),
    Case("LoRA header with a fractional shape", ["generate", "a cat", "--model", "tiny", "--lora",
                                                 "{files}/lora-shape-float.safetensors", "-o", "{tmp}/"], 2,
         "has a shape that is not a list of whole numbers"),
    Case("LoRA header whose shape and data size disagree", ["generate", "a cat", "--model", "tiny", "--lora",
                                                            "{files}/lora-size.safetensors", "-o", "{tmp}/"], 2,
         "declares 16 bytes for its shape [4, 8]"),
    Case("LoRA whose data is cut short", ["generate", "a cat", "--model", "tiny", "--lora",
                                          "{files}/lora-cut.safetensors", "-o", "{tmp}/"], 2, "is truncated"),
    # A non-finite result is never written as a success: NaN weights in a LoRA are refused as input, and
    # latents or pixels that are not finite fail the image (exit 1) with nothing written.
    Case("LoRA with NaN weights", ["generate", "a cat", "--model", "tiny", "--lora", "{files}/lora-nan",
                                   "-o", "{tmp}/"], 2, "has weights that are not finite (NaN or infinity in"),
    Case("model whose weights make NaN latents", ["generate", "a cat", "--model", "{files}/nan-transformer",
                                                  "-o", "{tmp}/"], 1,
         "the denoised latents hold NaN or infinity"),
    Case("latents holding NaN", ["decode", "{files}/latents/nan.latents.safetensors"], 2,
         "its latents hold NaN or infinity"),
    Case("LoRA made for another base model", ["generate", "a cat", "--model", "tiny", "--lora",
                                              "{files}/lora-other-base.safetensors", "-o", "{tmp}/"], 2,
         "does not fit tiny: transformer_blocks.0.attn1.to_q is 8->8 there and 2240->2240 in the LoRA"),
    Case("LoRA with a broken rank layout", ["generate", "a cat", "--model", "tiny", "--lora",
                                            "{files}/lora-rank.safetensors", "-o", "{tmp}/"], 2,
         "has a rank layout diffusers cannot load"),
    Case("LoRA scale NaN", ["generate", "a cat", "--model", "tiny", "--lora", "{files}/lora-other-base.safetensors:nan",
                            "-o", "{tmp}/"], 2, "must be a finite number, got nan"),
    Case("LoRA scale out of range", ["generate", "a cat", "--model", "tiny", "--lora",
                                     "{files}/lora-other-base.safetensors:9", "-o", "{tmp}/"], 2, "must be in -4..4"),
    Case("hub LoRA offline and not in the cache", ["generate", "a cat", "--model", "tiny", "--lora",
                                                   "someone/uncached-lora", "--offline", "-o", "{tmp}/"], 4,
         "is not in the Hugging Face cache and offline mode is on"),
    Case("bad 'lora' value in a batch row", ["batch", "{files}/lora-row.jsonl", "--model", "tiny"], 2,
         "line 1: 'lora' must be a string or a list of strings"),
    Case("ControlNet with a SANA-Sprint model", ["generate", "a cat", "--model", "tiny-sprint", "--controlnet",
                                                 "tiny-controlnet", "--control-image", "{files}/input.png"], 2,
         "tiny-sprint (SANA-Sprint) cannot use a ControlNet"),
    Case("ControlNet without a control image", ["generate", "a cat", "--model", "tiny", "--controlnet",
                                                "tiny-controlnet"], 2, "--controlnet needs a control image"),
    Case("control image without a ControlNet", ["generate", "a cat", "--model", "tiny", "--control-image",
                                                "{files}/input.png"], 2, "--control-image needs --controlnet"),
    Case("ControlNet made for another model", ["generate", "a cat", "--model", "tiny", "--controlnet",
                                               "{files}/controlnet-other", "--control-image", "{files}/input.png"], 2,
         "does not fit tiny: its num_attention_heads is 70"),
    Case("control image that is not an image", ["generate", "a cat", "--model", "tiny", "--controlnet",
                                                "tiny-controlnet", "--control-image", "{files}/ok.txt"], 2,
         "is not a readable image: not a PNG, JPEG or WebP file"),
    Case("truncated input image", ["generate", "a cat", "--model", "tiny-sprint", "--image",
                                   "{files}/truncated.png"], 2, "is not a readable image: image file is truncated"),
    Case("decompression bomb as an input image", ["generate", "a cat", "--model", "tiny-sprint", "--image",
                                                  "{files}/bomb.png"], 2, "is too large"),
    # Input images are bounded per side and by the work of the cover-resize, while planning (a 1-pixel strip
    # has few pixels and would be resized into gigapixels); the address-space limit keeps a regression cheap.
    Case("input image 100000x1 pixels", ["generate", "a cat", "--model", "tiny-sprint", "--image",
                                         "{files}/strip-100000x1.png", "-o", "{tmp}/"], 2,
         "is 100000x1: a side is longer than the 8192 pixels", limit_memory=3 * 2**30),
    Case("input image whose cover-resize is too large", ["generate", "a cat", "--model", "tiny", "--controlnet",
                                                         "tiny-controlnet", "--control-image",
                                                         "{files}/strip-8000x1.png", "-o", "{tmp}/"], 2,
         "covering 128x128 would resize it to 1024000x128 pixels", limit_memory=3 * 2**30),
    Case("input image between sana-cli's pixel limit and Pillow's own",
         ["generate", "a cat", "--model", "tiny-sprint", "--image", "{files}/pixels-9000x8000.png", "-o", "{tmp}/"],
         2, "is 9000x8000, larger than any image sana-cli writes", limit_memory=3 * 2**30),
    Case("strength that keeps no denoising step", ["generate", "a cat", "--model", "tiny", "--image",
                                                   "{files}/input.png", "--strength", "1e-17", "--steps", "20"], 2,
         "--strength 1e-17 keeps no denoising step of 20"),
    Case("strength outside 0-1 with a Sana model", ["generate", "a cat", "--model", "tiny", "--image",
                                                    "{files}/input.png", "--strength", "1.01"], 2,
         "--strength must be in 0..1 (above 0), got 1.01"),
    Case("--mask without --image", ["generate", "a cat", "--model", "tiny", "--mask", "{files}/mask.png"], 2,
         "--mask needs --image (the image to inpaint)"),
    Case("row 'mask' without 'image'", ["batch", "{files}/mask-row.jsonl", "--model", "tiny"], 2,
         "line 1: 'mask' needs 'image' (the image to inpaint)"),
    Case("mask of another size than the image", ["generate", "a cat", "--model", "tiny", "--image",
                                                 "{files}/input.png", "--mask", "{files}/mask-32x32.png"], 2,
         "--mask is 32x32 and --image 64x64: a mask must be the size of the image it masks"),
    Case("mask that is not an image", ["generate", "a cat", "--model", "tiny", "--image", "{files}/input.png",
                                       "--mask", "{files}/ok.txt"], 2,
         "ok.txt is not a readable image: not a PNG, JPEG or WebP file"),
    Case("decompression bomb as a mask", ["generate", "a cat", "--model", "tiny", "--image", "{files}/input.png",
                                          "--mask", "{files}/bomb.png"], 2, "is too large"),
    Case("mask with a SANA-Sprint model", ["generate", "a cat", "--model", "tiny-sprint", "--image",
                                           "{files}/input.png", "--mask", "{files}/mask.png"], 2,
         "tiny-sprint (SANA-Sprint) cannot inpaint: SanaSprintImg2ImgPipeline has no mask"),
    Case("strength outside 0-1", ["generate", "a cat", "--model", "tiny-sprint", "--image", "{files}/input.png",
                                  "--strength", "1.5"], 2, "--strength must be in 0..1 (above 0), got 1.5"),
    Case("strength zero", ["generate", "a cat", "--model", "tiny-sprint", "--image", "{files}/input.png",
                           "--strength", "0", "-o", "{tmp}/"], 2, "--strength must be in 0..1 (above 0), got 0"),
    Case("--strength without --image", ["generate", "a cat", "--model", "tiny-sprint", "--strength", "0.5"], 2,
         "--strength needs --image"),
    # `sana video`: frames and size against the Wan VAE's factors, the model's kind, the file, before anything loads.
    Case("video frames not 4k+1", ["video", "a cat", "--model", "tiny-video", "--frames", "10", "-o", "{tmp}/"], 2,
         "--frames 10 is not 4k+1 (the VAE makes 4 frames from each latent frame after the first) (try 9 or 13)"),
    Case("video frames zero", ["video", "a cat", "--model", "tiny-video", "--frames", "0", "-o", "{tmp}/"], 2,
         "--frames must be 1..1021, got 0"),
    Case("more video frames than the transformer places", ["video", "a cat", "--model", "tiny-video", "--frames",
                                                           "129", "-o", "{tmp}/"], 2,
         "--frames 129 is more than tiny-video can place in time (32 latent frames) (at most 125)"),
    Case("video side not a multiple of 32", ["video", "a cat", "--model", "tiny-video", "-W", "100", "-o", "{tmp}/"],
         2, "--width 100 is not a multiple of 32 (try 96 or 128)"),
    Case("video size the model cannot make", ["video", "a cat", "--model", "sana-video-2b-480p", "-W", "2048", "-H",
                                              "2048", "-o", "{tmp}/"], 2,
         "sana-video-2b-480p makes 832x480 videos and 2048x2048 is 11x its pixel count (try --width 832 --height 480"),
    Case("video with an image model", ["video", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "tiny is an image model (SanaPipeline)"),
    Case("first frame for a model without image-to-video", ["video", "a cat", "--model", "tiny", "--image",
                                                           "{files}/input.png", "-o", "{tmp}/"], 2,
         "tiny is an image model (SanaPipeline)"),
    Case("first frame that is not an image", ["video", "a cat", "--model", "tiny-video", "--image", "{files}/ok.txt",
                                              "-o", "{tmp}/"], 2, "is not a readable image"),
    Case("image command with a video model", ["generate", "a cat", "--model", "tiny-video", "-o", "{tmp}/"], 2,
         "tiny-video is a SANA-Video model; it makes videos"),
    Case("video file that exists", ["video", "a cat", "--model", "tiny-video", "-o", "{files}/taken.mp4"], 2,
         "already exists (pass --overwrite"),
    Case("unsupported video extension", ["video", "a cat", "--model", "tiny-video", "-o", "{tmp}/clip.gif"], 2,
         "cannot write '.gif' videos (use .mp4 or .webm)"),
    Case("motion score out of range", ["video", "a cat", "--model", "tiny-video", "--motion-score", "101", "-o",
                                       "{tmp}/"], 2, "--motion-score must be 0..100, got 101"),
    Case("image decode strategy for a video", ["video", "a cat", "--model", "tiny-video", "--decode", "strips", "-o",
                                               "{tmp}/"], 2, "--decode strips is an image decode"),
    Case("video column in an image batch", ["batch", "{files}/frames-row.jsonl", "--model", "tiny", "-o", "{tmp}/b"], 2,
         "line 1: 'frames' is for SANA-Video models; tiny makes images"),
    Case("image-only column in a video batch", ["batch", "{files}/lora-row-video.jsonl", "--model", "tiny-video", "-o",
                                                "{tmp}/b"], 2, "line 1: 'lora' is for images; a video row takes"),
    Case("video batch frames not 4k+1", ["batch", "{files}/frames-bad-row.jsonl", "--model", "tiny-video", "-o",
                                         "{tmp}/b"], 2, "line 1: 'frames' 6 is not 4k+1"),
    # --quantize: a weight format is checked before anything loads; what the machine cannot run is exit 4.
    Case("unknown --quantize value", ["generate", "a cat", "--model", "tiny", "--quantize", "int4", "-o", "{tmp}/"], 2,
         "'int4' is not one of 'int8', 'fp8', 'nf4'"),
    Case("--quantize int8 with --fp8",
         ["generate", "a cat", "--model", "tiny", "--quantize", "int8", "--fp8", "-o", "{tmp}/"], 2,
         "--quantize int8 conflicts with --fp8"),
    Case("--quantize nf4 without a CUDA GPU",
         ["generate", "a cat", "--model", "tiny", "--quantize", "nf4", "-o", "{tmp}/"], 4,
         "--quantize nf4 needs a CUDA GPU"),
    Case("--quantize fp8 without a CUDA GPU",
         ["generate", "a cat", "--model", "tiny", "--quantize", "fp8", "-o", "{tmp}/"], 4, "--fp8 needs a CUDA GPU"),
    Case("--lora with --quantize", ["generate", "a cat", "--model", "tiny", "--quantize", "int8", "--lora",
                                    "{files}/lora-fits.safetensors", "-o", "{tmp}/"], 2,
         "--lora cannot be combined with --quantize int8"),
    Case("sana serve on a non-loopback address without an API key", ["serve", "--host", "0.0.0.0"], 2,
         "--host 0.0.0.0 is not a loopback address: set --api-key"),
    Case("bad --keep-alive", ["serve", "--keep-alive", "soon"], 2, "'soon' is not a duration"),
    Case("--alias without a model", ["serve", "--alias", "dall-e-3"], 2, "--alias 'dall-e-3' is not NAME=MODEL"),
    Case("--alias to a model directory", ["serve", "--alias", "dall-e-3={tiny}"], 2,
         "the model must be a preset or a hub id"),
    # Port 9 on the loopback is closed: a named server that nobody answers is an error, never a silent fallback.
    Case("SANA_SERVER that nobody answers", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 4,
         "no sana server answers at http://127.0.0.1:9", env={"SANA_SERVER": "http://127.0.0.1:9"}),
    Case("SANA_SERVER that is not a server address", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "is not http://HOST:PORT or unix:/PATH", env={"SANA_SERVER": "ftp://example"}),
    Case("SANA_SERVER with an unclosed IPv6 bracket", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "is not http://HOST:PORT or unix:/PATH", env={"SANA_SERVER": "http://[::1"}),
    Case("SANA_SERVER with port 0 or above 65535", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "has a bad port", env={"SANA_SERVER": "http://127.0.0.1:0"}),
    Case("SANA_SERVER with credentials, a query or a fragment",
         ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 2,
         "is not http://HOST:PORT or unix:/PATH", env={"SANA_SERVER": "http://me@127.0.0.1:9"}),
    # Fake servers on Unix sockets among the prepared files (see _fake_servers): a server is untrusted input.
    Case("SANA_SERVER whose handshake is not sana's", ["generate", "a cat", "--model", "tiny", "-o", "{tmp}/"], 4,
         "answered the handshake with a malformed answer", env={"SANA_SERVER": "unix:{files}/not-sana.sock"}),
    Case("SANA_SERVER answering a line that is not JSON",
         ["generate", "a cat", "--model", "tiny", "--size", "128", "-o", "{tmp}/"], 1, "was malformed",
         env={"SANA_SERVER": "unix:{files}/garbage.sock"}),
    Case("SANA_SERVER sending another job's image",
         ["generate", "a cat", "--model", "tiny", "--size", "128", "-o", "{tmp}/"], 1,
         "does not carry the key of the job it was sent for", env={"SANA_SERVER": "unix:{files}/other-key.sock"}),
    Case("input image changed between planning and sending it to a server",
         ["generate", "a street", "--model", "tiny-sprint", "--image", "{files}/changing.png", "-o", "{tmp}/"], 2,
         "changed after the run was planned (its sha256 differs); run again",
         env={"SANA_SERVER": "unix:{files}/changes.sock"}),
    Case("input image larger than a server is sent",
         ["generate", "a street", "--model", "tiny-sprint", "--image", "{files}/huge.png", "-o", "{tmp}/"], 2,
         "is larger than the 256 MiB a file sent to a server may be", env={"SANA_SERVER": "unix:{files}/ok.sock"}),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models) -> Path:
    """Every prepared bad (and good odd) input."""
    root = tmp_path_factory.mktemp("inputs")
    tiny = tiny_models["sana"]
    (root / "not-a-model").mkdir()
    shutil.copytree(tiny, root / "corrupt")
    weights = next((root / "corrupt" / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:3000])
    shutil.copytree(tiny, root / "pickle")
    transformer = root / "pickle" / "transformer"
    import torch
    from safetensors.torch import load_file

    state = load_file(str(next(transformer.glob("*.safetensors"))))
    for path in transformer.glob("*.safetensors"):
        path.unlink()
    torch.save(state, transformer / "diffusion_pytorch_model.bin")
    shutil.copytree(tiny, root / "custom-code")
    index = json.loads((root / "custom-code" / "model_index.json").read_text())
    index["vae"] = ["my_evil_module", "MyVAE"]
    (root / "custom-code" / "model_index.json").write_text(json.dumps(index))
    (root / "a-file").write_text("in the way")
    (root / "taken.png").write_bytes(b"precious")
    (root / "taken.mp4").write_bytes(b"precious")
    (root / "frames-row.jsonl").write_text('{"prompt": "a cat", "frames": 9}\n')
    (root / "lora-row-video.jsonl").write_text('{"prompt": "a cat", "lora": "x.safetensors"}\n')
    (root / "frames-bad-row.jsonl").write_text('{"prompt": "a cat", "frames": 6}\n')
    (root / "empty.txt").write_text("# nothing here\n\n")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    (root / "noprompt.csv").write_text("text,seed\na cat,1\n")
    (root / "unknown.jsonl").write_text('{"prompt": "a", "colour": "red"}\n')
    (root / "types.jsonl").write_text('{"prompt": "a", "steps": "many"}\n')
    (root / "dupes.jsonl").write_text('{"prompt": "a", "name": "cat"}\n{"prompt": "b", "name": "Cat"}\n')
    (root / "escape.jsonl").write_text('{"prompt": "a", "name": "../../x"}\n')
    (root / "absolute.jsonl").write_text('{"prompt": "a", "name": "/etc/cron.d/x"}\n')
    (root / "ok.txt").write_text("a cat\n")
    _gpu_run_latents(root)
    (root / "size-row.jsonl").write_text('{"prompt": "a cat", "size": 100}\n')
    (root / "one-huge.jsonl").write_text('{"prompt": "small"}\n{"prompt": "huge", "size": 4096}\n'
                                         '{"prompt": "small too"}\n')
    (root / "newline.jsonl").write_text(
        json.dumps({"prompt": "first line\nsecond line \"quoted\" 🐼", "seed": 2}) + "\n")
    _untrusted_files(root, tiny)
    for name in ("manifest-dir", "manifest-dangling", "manifest-link", "manifest-foreign"):
        (root / name).mkdir()
    (root / "manifest-dir" / "results.jsonl").mkdir()
    (root / "manifest-dangling" / "results.jsonl").symlink_to(root / "no-such-file.jsonl")
    (root / "outside.jsonl").write_text('{"event": "image", "file": "x.png", "key": "k"}\n')
    (root / "manifest-link" / "results.jsonl").symlink_to(root / "outside.jsonl")
    (root / "manifest-foreign" / "results.jsonl").write_text('{"my": "notes"}\n')
    (root / "inf-guidance.jsonl").write_text('{"prompt": "a", "guidance": Infinity}\n')
    (root / "huge-guidance.jsonl").write_text('{"prompt": "a", "guidance": 1e300}\n')
    (root / "huge-seed.jsonl").write_text('{"prompt": "a", "seed": 9223372036854775808}\n')
    odd = "a\x0bb\x0cc\x1cd\x1de\x85f\u2028g\u2029h"
    (root / "separators.jsonl").write_text(json.dumps({"prompt": "fox " + odd, "seed": 1}, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    (root / "separators.txt").write_text("fox " + odd + "\n", encoding="utf-8")
    (root / "utf16.txt").write_text("a red fox\n", encoding="utf-16")
    (root / "utf16-nobom.txt").write_bytes("a red fox\n".encode("utf-16-le"))
    (root / "repeated.jsonl").write_text('{"prompt": "a", "seed": 1, "seed": 2}\n')
    (root / "repeated.csv").write_text("prompt,seed,seed\na,1,2\n")
    (root / "carriage-return.csv").write_bytes(b"prompt,seed\na,1\nb\rc,2\n")
    (root / "million.jsonl").write_text('{"prompt": "a cat", "n": 10000}\n' * 101)
    (root / "spaced-names.jsonl").write_text('{"prompt": "a", "name": "cat"}\n{"prompt": "b", "name": " cat "}\n')
    _input_files(root)
    _latents_files(root)
    _non_finite_files(root, tiny)
    return root


def _gpu_run_latents(root: Path) -> None:
    """gpu-run.latents.safetensors: the latents a CUDA run of the tiny model kept, with the metadata it writes."""
    import torch

    from sana_cli.version import __version__
    from sana_cli.storage import latents
    from sana_cli.planning.plan import KEY_SCHEMA, Request, model_for, plan_generate

    request = Request(prompt="a cat", model="tiny", steps=2, seed=1, output=str(root / "gpu-run.png"))
    job = plan_generate(request, model_for(request)).jobs[0]
    meta = {"sana_cli": __version__, "key": job.key, **job.params(), "rendered": "128x128", "decode": None,
            "chi": True, "model": "tiny", "model_id": "tiny:sana", "revision": None, "commit": None,
            "pipeline": "SanaPipeline", "device": "cuda:0", "dtype": "bfloat16", "generator": "cuda",
            "scheduler": "DPMSolverMultistepScheduler", "versions": {}, "key_schema": KEY_SCHEMA,
            "pixel_options": {**job.pixels.to_dict(), "device": "cuda"}}
    latents.save(str(root / "gpu-run.png"), torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16), meta, "bfloat16")
def _latents_files(root: Path) -> None:
    """A real kept latents file from the tiny model, and copies with one thing changed each."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .conftest import run_sana

    folder = root / "latents"
    made = run_sana("generate", "a cat", "--model", "tiny", "--seed", 1, "--steps", 1, "--keep-latents",
                    "-o", folder / "good.png")
    assert made.returncode == 0, made.stderr
    (folder / "good.png").unlink()
    with safe_open(str(folder / "good.latents.safetensors"), framework="pt") as handle:
        info, latents = handle.metadata(), handle.get_tensor("latents")
    meta = json.loads(info["sana"])
    assert tuple(latents.shape) == (1, 4, 32, 32)

    def variant(name: str, tensors=None, **changes):
        metadata = {**info, **{key: value for key, value in changes.items() if key != "meta"}}
        if "meta" in changes:
            metadata["sana"] = json.dumps(changes["meta"])
        save_file(tensors or {"latents": latents}, str(folder / f"{name}.latents.safetensors"), metadata=metadata)

    variant("meta-not-json", sana="{not json")
    variant("no-model", meta={key: value for key, value in meta.items() if key != "model_id"})
    variant("slash-name", image="../escaped.png")
    variant("nul-name", image="cat\0.png")
    variant("bad-device", meta={**meta, "device": "gpu; rm -rf ~"})
    variant("rank3", tensors={"latents": latents[0].clone()})
    variant("extra", tensors={"latents": latents, "more": latents.clone()})
    variant("wide", tensors={"latents": torch.zeros(1, 4, 8, 2600)})
    variant("huge-size", meta={**meta, "width": 16384, "height": 16384})
    variant("channels", tensors={"latents": torch.zeros(1, 8, 32, 32)})
    poisoned = latents.clone()
    poisoned[0, 0, 3, 3] = float("nan")
    variant("nan", tensors={"latents": poisoned})


def _non_finite_files(root: Path, tiny: Path) -> None:
    """A tiny LoRA with one NaN weight, and tiny models with NaN in the transformer's output layer or the
    VAE decoder's last convolution."""
    import torch
    from safetensors.torch import load_file, save_file

    from sana_cli.engine.tiny_build import build_lora

    weights = build_lora(root / "lora-nan")
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first][0, 0] = float("nan")
    save_file(state, str(weights))
    for name, component, tensor in (("nan-transformer", "transformer", "proj_out.weight"),
                                    ("nan-vae", "vae", "decoder.conv_out.weight")):
        shutil.copytree(tiny, root / name)
        path = next((root / name / component).glob("*.safetensors"))
        state = load_file(str(path))
        state[tensor] = torch.full_like(state[tensor], float("nan"))
        save_file(state, str(path))
    _fake_servers(root)
    return root


_FAKES = []  # they serve until the test process ends


def _fake_servers(root: Path) -> None:
    from .fakeserver import FakeServer, image_bytes, image_event

    _FAKES.append(FakeServer(unix=root / "not-sana.sock", health=b"[1, 2]"))
    _FAKES.append(FakeServer(unix=root / "garbage.sock", events=lambda jobs: [b"<html>hello</html>\n"]))
    _FAKES.append(FakeServer(unix=root / "other-key.sock", events=lambda jobs: [
        image_event(jobs[0]["index"], image_bytes(jobs[0], key="f" * 64))]))
    from PIL import Image

    from sana_cli.server.wire import MAX_INPUT_FILE_BYTES

    colours = iter(range(1, 10**6))
    Image.new("RGB", (64, 64)).save(root / "changing.png")
    changes = FakeServer(unix=root / "changes.sock")  # the handshake comes after planning: the file changes then
    changes.on_health = lambda: Image.new("RGB", (64, 64), (next(colours) % 256, 0, 0)).save(root / "changing.png")
    _FAKES.append(changes)
    _FAKES.append(FakeServer(unix=root / "ok.sock"))
    Image.new("RGB", (64, 64)).save(root / "huge.png")
    with open(root / "huge.png", "r+b") as handle:  # a valid PNG followed by zeros (a sparse file)
        handle.truncate(MAX_INPUT_FILE_BYTES + 1)


def _input_files(root: Path) -> None:
    """LoRA, ControlNet and input-image files that must be refused (their headers and configs only)."""
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    def pair(module: str, a: tuple, b: tuple) -> dict:
        prefix = f"transformer.{module}"
        return {f"{prefix}.lora_A.weight": np.ones(a, np.float32), f"{prefix}.lora_B.weight": np.ones(b, np.float32)}

    save_file(pair("transformer_blocks.0.attn1.to_q", (4, 2240), (2240, 4)), str(root / "lora-other-base.safetensors"))
    save_file(pair("transformer_blocks.0.attn1.to_q", (4, 8), (8, 2)), str(root / "lora-rank.safetensors"))
    save_file(pair("transformer_blocks.0.attn1.to_q", (4, 8), (8, 4)), str(root / "lora-fits.safetensors"))
    (root / "lora.bin").write_bytes(b"\x80\x02}q\x00.")
    a_name, b_name = (f"transformer.transformer_blocks.0.attn1.to_q.lora_{x}.weight" for x in "AB")

    def crafted(name: str, a_entry: dict) -> None:  # a well-formed lora_B beside a crafted lora_A
        header = {a_name: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128], **a_entry},
                  b_name: {"dtype": "F32", "shape": [8, 4], "data_offsets": [128, 256]}}
        text = json.dumps(header).encode()
        (root / name).write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 256)

    crafted("lora-offsets-text.safetensors", {"data_offsets": ["zero", "x"]})
    crafted("lora-shape-text.safetensors", {"shape": ["four", 8]})
    crafted("lora-shape-float.safetensors", {"shape": [4.5, 8]})
    crafted("lora-size.safetensors", {"data_offsets": [0, 16]})
    crafted("lora-cut.safetensors", {"data_offsets": [128, 100128], "shape": [25000]})
    (root / "not-a-lora.safetensors").write_text("this is not a safetensors file")
    (root / "lora-row.jsonl").write_text('{"prompt": "a", "lora": 3}\n')
    (root / "controlnet-other").mkdir()
    (root / "controlnet-other" / "config.json").write_text(json.dumps(
        {"_class_name": "SanaControlNetModel", "num_attention_heads": 70, "attention_head_dim": 32}))
    Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "input.png")
    Image.new("L", (64, 64), 255).save(root / "mask.png")
    Image.new("L", (32, 32), 255).save(root / "mask-32x32.png")
    (root / "mask-row.jsonl").write_text(json.dumps({"prompt": "a", "mask": str(root / "mask.png")}) + "\n")
    whole = (root / "input.png").read_bytes()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(root / "noise.png")
    _png(root / "strip-100000x1.png", 100000, 1)
    _png(root / "strip-8000x1.png", 8000, 1)
    _png(root / "pixels-9000x8000.png", 9000, 8000, rows=1)  # refused from its header: one row is enough
    (root / "truncated.png").write_bytes((root / "noise.png").read_bytes()[: len(whole) // 2 + 200])


def _png(path: Path, width: int, height: int, rows: int | None = None) -> None:
    """A black RGB PNG of any size in a few hundred bytes (its zero rows compress to almost nothing)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    pixels = zlib.compress(b"\0" * ((3 * width + 1) * (height if rows is None else rows)), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _untrusted_files(root: Path, tiny: Path) -> None:
    """Crafted files for the untrusted-input cases: nothing here is committed, all is made now."""
    import struct
    import zlib

    from PIL import Image

    from sana_cli.storage.images import encode_image

    (root / "postscript.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo-out.png")
    (root / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.mp4")
    (root / "zero.webm").symlink_to("/dev/zero")
    (root / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video at all " * 50)
    import av

    with av.open(str(root / "plain.mp4"), mode="w") as container:  # a video from elsewhere: no tags of ours
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 32), "red"))), *stream.encode()]:
            container.mux(packet)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header
                                    + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    Image.new("RGB", (16, 16)).save(root / "plain.png")
    from PIL import PngImagePlugin

    other_tool = PngImagePlugin.PngInfo()
    other_tool.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    Image.new("RGB", (16, 16)).save(root / "params-only.png", pnginfo=other_tool)
    meta = {"prompt": "p", "width": 128, "height": 128, "steps": 2, "guidance": 4.5, "seed": 1}
    (root / "no-model.png").write_bytes(encode_image(Image.new("RGB", (16, 16)), "PNG", meta))
    (root / "bad-steps.png").write_bytes(encode_image(Image.new("RGB", (16, 16)), "PNG",
                                                      {**meta, "model": "tiny", "steps": "2; rm -rf ~"}))
    shutil.copytree(tiny, root / "fifo-model")
    (root / "fifo-model" / "model_index.json").unlink()
    os.mkfifo(root / "fifo-model" / "model_index.json")
    shutil.copytree(tiny, root / "zero-model")
    (root / "zero-model" / "text_encoder" / "config.json").unlink()
    (root / "zero-model" / "text_encoder" / "config.json").symlink_to("/dev/zero")
    (root / "rtl.jsonl").write_text(json.dumps({"prompt": "a", "name": "cat\u202egnp.exe"}) + "\n")
    (root / "zwsp.jsonl").write_text(json.dumps({"prompt": "a", "name": "c\u200bat"}) + "\n")


def expand(value: str, tmp: Path, files: Path, tiny: Path) -> str:
    long_prompt = " ".join(["a cute red fox sitting in the snow under the moon"] * 40)
    return value.format(tmp=tmp, files=files, tiny=tiny, long_prompt=long_prompt)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, files, tiny_dir, tmp_path):
    args = [expand(str(a), tmp_path, files, tiny_dir) for a in case.args]

    before = sorted(p.name for p in tmp_path.iterdir())
    env = {key: expand(value, tmp_path, files, tiny_dir) for key, value in case.env.items()}
    if case.limit_memory or case.limit_file_size:  # limits set by prlimit on a fresh process, as a user's shell does
        command = limited([SANA, *args], memory=case.limit_memory, file_size=case.limit_file_size)
        process = subprocess.run(command, input=case.stdin, capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, **env))
    else:
        process = run_sana(*args, input=case.stdin, env=env, timeout=300)
    assert process.returncode == case.code, process.stderr
    if case.code == 0:
        assert "Traceback" not in process.stderr
        assert case.says in process.stderr
        for line in process.stdout.splitlines():  # written paths: inside the chosen directory, short names
            assert Path(line).exists() and len(Path(line).name.encode()) <= 80
        return
    line = one_line_error(process)
    assert case.says in line
    if case.code == 3:  # the batch carried on: the other rows are written, their paths on stdout
        assert len(process.stdout.splitlines()) == 2
        return
    assert process.stdout == ""
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, "a failed run left files behind"
    for taken in ("taken.png", "taken.mp4"):
        if taken in " ".join(args):
            assert (files / taken).read_bytes() == b"precious"


def test_allow_pickle_loads_what_the_default_refuses(sana, files, tmp_path):
    process = sana("generate", "a cat", "--model", files / "pickle", "--allow-pickle", "--seed", 1,
                   "-o", f"{tmp_path}/")
    assert process.returncode == 0, process.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_every_float_option_of_every_command_refuses_nan_and_infinity():
    """The class, not the cases above: each float option of each command (found by walking the CLI) is
    refused with NaN and with infinity by the installed `sana`, exit 2 with one line, before anything runs."""
    import click

    from sana_cli.cli.options import FiniteFloat
    from sana_cli.cli import cli

    floats = [(name, param) for name, command in cli.commands.items() for param in command.params
              if isinstance(param, click.Option) and isinstance(param.type, click.types.FloatParamType)]
    assert len(floats) >= 12
    for name, param in floats:
        assert isinstance(param.type, FiniteFloat), (name, param.name)
        positional = ["x" for other in cli.commands[name].params if isinstance(other, click.Argument)]
        for bad in ("nan", "inf"):
            process = run_sana(name, *positional, param.opts[-1], bad, "--debug", timeout=60)
            assert process.returncode == 2, (name, param.name, bad, process.stderr)
            assert f"'{bad}' is not a finite number" in one_line_error(process)


def test_the_python_api_refuses_a_non_finite_max_memory_before_loading(tmp_path):
    import sana_cli
    from sana_cli.errors import UsageError

    for bad in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="max_memory must be a finite number"):
            sana_cli.generate("a cat", model="tiny", max_memory=bad, output=str(tmp_path / "new" / "x.png"))
    assert list(tmp_path.iterdir()) == []


def test_non_finite_pixels_are_no_image_and_a_batch_records_the_row_as_failed(files, tmp_path):
    """NaN pixels from the VAE: exit 1 with one line and no image (the finite latents are kept, as for any
    failed decode); in a batch the row is a recorded failure, exit 3, never a black image taken for done."""
    process = run_sana("generate", "a cat", "--model", files / "nan-vae", "-o", tmp_path / "cat.png", timeout=300)
    assert process.returncode == 1, process.stderr
    assert "the decoded image holds NaN or infinity" in one_line_error(process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.latents.safetensors"]
    batch = run_sana("batch", files / "ok.txt", "--model", files / "nan-transformer", "-o", tmp_path / "b", "--json",
                     timeout=300)
    assert batch.returncode == 3, batch.stderr
    summary = json.loads(batch.stdout)
    assert summary["written"] == 0 and summary["failed"] == 1
    assert "the denoised latents hold NaN or infinity" in summary["failures"][0]["error"]
    assert not list((tmp_path / "b").glob("*.png"))
    records = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r.get("event") in ("image", "error")] == ["error"]
@dataclass
class HttpCase:
    """A request `sana serve` must refuse with an OpenAI error object (tests/test_openai_clients.py sends
    each to a real server); in the README table its "exit" column is the HTTP status."""

    name: str
    method: str
    path: str
    body: object  # a dict sent as JSON, or bytes sent as they are; for an edit, a function giving (fields, files)
    code: int
    says: str
    headers: dict | None = None


_TINY = {"prompt": "a cat", "model": "tiny", "size": "128x128"}
HTTP_CASES = [
    HttpCase("HTTP: output_format as a list", "POST", "/v1/images/generations", {**_TINY, "output_format": ["png"]},
             400, "'output_format' must be one of png, jpeg, jpg, webp"),
    HttpCase("HTTP: background transparent", "POST", "/v1/images/generations", {**_TINY, "background": "transparent"},
             400, "background 'transparent' cannot be rendered"),
    HttpCase("HTTP: quality that is not OpenAI's", "POST", "/v1/images/generations", {**_TINY, "quality": {}},
             400, "'quality' must be one of"),
    HttpCase("HTTP: output_compression with png", "POST", "/v1/images/generations",
             {**_TINY, "output_compression": 50}, 400, "'output_compression' applies to jpeg and webp only"),
    HttpCase("HTTP: partial_images without stream", "POST", "/v1/images/generations",
             {**_TINY, "partial_images": 2}, 400, "'partial_images' needs 'stream': true"),
    HttpCase("HTTP: a number too large for a float", "POST", "/v1/images/generations", {**_TINY, "guidance": 10**400},
             400, "'guidance' must be float (a finite number)"),
    HttpCase("HTTP: a PAG layer the model lacks", "POST", "/v1/images/generations",
             {**_TINY, "pag_scale": 2.0, "pag_layers": "no_such_layer"}, 400,
             "'no_such_layer' matches no self-attention layer of tiny"),
    HttpCase("HTTP: a PAG layer that is not a pattern", "POST", "/v1/images/generations",
             {**_TINY, "pag_scale": 2.0, "pag_layers": "["}, 400, "'[' is not a valid pattern"),
    HttpCase("HTTP: GIF output", "POST", "/v1/images/generations", {**_TINY, "output_format": "gif"}, 400,
             "output_format 'gif' is not supported here"),
    HttpCase("HTTP: JSON nested 100000 deep", "POST", "/v1/images/generations", b"[" * 100000 + b"]" * 100000, 400,
             "the request body is not valid JSON"),
    HttpCase("HTTP: JSON nested deeper than 32 levels", "POST", "/v1/images/generations",
             ('{"prompt": ' + "[" * 40 + "]" * 40 + "}").encode(), 400, "nests deeper than 32 levels"),
    HttpCase("HTTP: an attached job with a list for decode", "POST", "/v1/sana/jobs",
             {"model": "tiny", "decode": ["auto"], "jobs": [{"prompt": "a cat"}]}, 400, "'decode' must be text"),
    HttpCase("HTTP: image variations", "POST", "/v1/images/variations", {}, 400,
             "image variations are not supported: Sana's image-to-image needs a prompt"),
    HttpCase("HTTP: an image edit sent as JSON", "POST", "/v1/images/edits", {"prompt": "a cat"}, 415,
             "must be sent as multipart/form-data"),
    HttpCase("HTTP: GET on the generations route", "GET", "/v1/images/generations", None, 405,
             "GET is not allowed here; use POST"),
    HttpCase("HTTP: a model nobody aliased", "GET", "/v1/models/no-such-model", None, 404,
             "the model 'no-such-model' does not exist here"),
]


def _png_bytes(size=(64, 64)) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def _bomb() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


_EDIT = {"prompt": "make it night", "model": "tiny-sprint", "seed": 1}


def _edit(fields: dict | None = None, files: list | None = None, **changes):
    """An edit's form, made when sent: (fields, files) with one good image unless `files` is given."""
    return lambda: ({**_EDIT, **(fields or {}), **changes},
                    files() if callable(files) else files if files is not None else
                    [("image", "in.png", _png_bytes(), "image/png")])


# Image edits (multipart forms), sent by tests/test_openai_clients.py to a real server; rows of the README table.
EDIT_CASES = [
    HttpCase("HTTP: an edit upload that is not an image", "POST", "/v1/images/edits",
             _edit(files=[("image", "in.png", b"%!PS-Adobe-3.0\n", "image/png")]), 400,
             "--image: in.png is not a readable image: not a PNG, JPEG or WebP file"),
    HttpCase("HTTP: an edit upload that is a decompression bomb", "POST", "/v1/images/edits",
             _edit(files=lambda: [("image", "bomb.png", _bomb(), "image/png")]), 400, "is too large"),
    HttpCase("HTTP: an edit with two images", "POST", "/v1/images/edits",
             _edit(files=lambda: [("image[]", name, _png_bytes(), "image/png") for name in ("a.png", "b.png")]), 400,
             "Sana edits one image at a time (image-to-image from one start image); this request sends 2"),
    HttpCase("HTTP: an edit with more files than a form takes", "POST", "/v1/images/edits",
             _edit(files=lambda: [("image[]", f"{i}.png", _png_bytes((8, 8)), "image/png") for i in range(9)]), 400,
             "too many files in one request (at most 8)"),
    HttpCase("HTTP: an edit upload over 50 MiB", "POST", "/v1/images/edits",
             _edit(files=lambda: [("image", "big.png", _png_bytes() + b"\0" * (50 << 20), "image/png")]), 400,
             "the uploaded image is larger than 50 MiB"),
    HttpCase("HTTP: an edit with strength out of range", "POST", "/v1/images/edits", _edit(strength=1.5), 400,
             "--strength must be in 0..1 (above 0), got 1.5"),
    HttpCase("HTTP: an edit without an image", "POST", "/v1/images/edits", _edit(files=[]), 400,
             "'image' is required"),
    HttpCase("HTTP: an edit's image as text", "POST", "/v1/images/edits", _edit(image="https://example.com/a.png",
                                                                                  files=[]), 400,
             "'image' must be an uploaded file"),
    HttpCase("HTTP: an edit form posted by another site's page", "POST", "/v1/images/edits", _edit(), 403,
             "a form posted by a page of another site is refused", headers={"Origin": "https://evil.example"}),
]


def test_at_least_thirty_bad_inputs_and_the_readme_table_lists_every_case():
    assert len([c for c in CASES if c.code != 0]) >= 30
    readme = README.read_text()
    table = readme.split("### Bad input and what sana says", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].isdigit():
            rows[cells[0]] = (int(cells[1]), cells[2])
    for case in [*CASES, *HTTP_CASES, *EDIT_CASES]:
        assert case.name in rows, f"README table lacks {case.name!r}"
        code, says = rows[case.name]
        assert code == case.code, case.name
        assert re.sub(r"`", "", says).find(case.says.replace("|", "\\|")) >= 0 or case.says == "", case.name


if __name__ == "__main__":  # print the README table rows
    for case in [*CASES, *HTTP_CASES, *EDIT_CASES]:
        print(f"| {case.name} | {case.code} | {('`' + case.says + '`') if case.says else 'works'} |")
