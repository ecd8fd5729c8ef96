#!/usr/bin/env bash
# What a CI job runs to check that sana-cli works: the built-in tiny model on CPU, exit codes and
# the JSON output checked. Needs only an installed sana-cli (see README); no GPU, no network.
set -euo pipefail
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1. One image; stdout is exactly one JSON object.
sana generate "a cyberpunk cat with a neon sign" --model tiny --seed 42 -o "$out/cat.png" --json > "$out/generate.json"
python3 - "$out/generate.json" "$out/cat.png" <<'PY'
import json, os, sys
data = json.load(open(sys.argv[1]))
assert data["ok"] is True, data
image = data["images"][0]
assert image["path"] == sys.argv[2] and os.path.getsize(sys.argv[2]) == image["bytes"], image
assert image["seed"] == 42 and image["width"] == 128, image
print("ci-smoke: generate ok:", image["path"], image["sha256"][:12])
PY

# 2. The metadata reproduces the image.
test "$(sana info "$out/cat.png" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sana"]["seed"])')" = 42

# 3. Bad input exits 2 with one line on stderr and nothing on stdout.
set +e
sana generate "a cat" --size 1000 > "$out/stdout" 2> "$out/stderr"
code=$?
set -e
test "$code" -eq 2 && test ! -s "$out/stdout" && test "$(wc -l < "$out/stderr")" -eq 1
echo "ci-smoke: bad size exits 2: $(cat "$out/stderr")"

# 4. An existing file is never overwritten: exit 2, file unchanged.
before=$(sha256sum "$out/cat.png")
set +e; sana generate "a cyberpunk cat with a neon sign" --model tiny --seed 42 -o "$out/cat.png" 2>/dev/null; code=$?; set -e
test "$code" -eq 2 && test "$(sha256sum "$out/cat.png")" = "$before"
echo "ci-smoke: existing file kept"

# 5. A batch with per-row overrides (sizes forced onto the 128px tiny model), then a resume that
#    finds everything done and loads nothing.
sana batch examples/prompts.jsonl --model tiny --force-size -o "$out/batch" --json -q > "$out/batch.json"
sana batch examples/prompts.jsonl --model tiny --force-size -o "$out/batch" --json -q > "$out/resume.json"
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
first, again = (json.load(open(os.path.join(out, name))) for name in ("batch.json", "resume.json"))
assert first["ok"] and first["written"] == 6 and first["failed"] == 0, first
assert again["ok"] and again["written"] == 0 and again["already_done"] == 6, again
lines = open(os.path.join(out, "batch", "results.jsonl")).read().splitlines()
assert len(lines) == 6 and all(json.loads(line)["event"] == "image" for line in lines)
assert os.path.exists(os.path.join(out, "batch", "fox.png"))
print("ci-smoke: batch ok:", first["written"], "images, resume found", again["already_done"], "done")
PY
echo "ci-smoke: all checks passed"
