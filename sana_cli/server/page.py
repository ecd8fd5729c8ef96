"""The small page `sana serve` answers at /: type a prompt, see the images as they finish."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sana serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
form{display:flex;gap:.5rem;flex-wrap:wrap}#prompt{flex:1 1 20rem}
#images{display:flex;flex-wrap:wrap;gap:.5rem;margin-top:1rem}#images img{max-width:16rem}
#status{color:#555;margin-top:.5rem}
</style></head><body>
<h1>sana serve</h1>
<form id="form">
<input id="prompt" name="prompt" placeholder="a cyberpunk cat with a neon sign" required>
<select id="model" name="model"></select>
<input id="n" name="n" type="number" min="1" max="10" value="1" style="width:4rem">
<input id="key" name="key" type="password" placeholder="API key (if the server has one)">
<button id="go" type="submit">Generate</button>
</form>
<div id="status"></div>
<div id="images"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadModels() {
  try {
    const answer = await fetch("/v1/models", {headers: headers()});
    const list = await answer.json();
    for (const m of list.data || []) {
      const option = document.createElement("option");
      option.value = m.id; option.textContent = m.id + (m.loaded ? " (loaded)" : "");
      $("model").appendChild(option);
    }
    const loaded = (list.data || []).find((m) => m.loaded);
    if (loaded) $("model").value = loaded.id;
  } catch (e) { $("status").textContent = "cannot list models: " + e; }
}
async function one(prompt, model) {
  const answer = await fetch("/v1/images/generations", {method: "POST", headers: headers(),
    body: JSON.stringify({prompt, model, n: 1, response_format: "b64_json"})});
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error((body.error || {}).message || String(answer.status));
  const item = body.data[0];
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.alt = prompt; img.title = "seed " + item.seed; img.dataset.seed = item.seed;
  $("images").appendChild(img);
}
async function generate(prompt, model, n) {
  // One request per image, all at once: the server batches them, and each shows as soon as it is done.
  let done = 0, failed = "";
  $("status").textContent = "0 of " + n + " done";
  await Promise.all(Array.from({length: n}, () => one(prompt, model).then(
    () => { done += 1; $("status").textContent = done + " of " + n + " done"; },
    (e) => { failed = String(e.message || e); })));
  $("status").textContent = failed ? "error: " + failed : "done";
}
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const n = Math.min(Math.max(parseInt($("n").value, 10) || 1, 1), 10);
  generate($("prompt").value, $("model").value, n);
});
// A link may fill the form (?prompt=...&model=...&n=...), never send it: only the person at the page
// does, by pressing Generate, so another site that opens or frames this page cannot make it render.
loadModels().then(() => {
  const query = new URLSearchParams(location.search);
  if (query.get("prompt")) $("prompt").value = query.get("prompt");
  if (query.get("model")) $("model").value = query.get("model");
  const n = parseInt(query.get("n") || "1", 10);
  $("n").value = String(Math.min(Math.max(Number.isFinite(n) ? n : 1, 1), 10));
});
</script>
</body></html>
"""
