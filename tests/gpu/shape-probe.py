#!/usr/bin/env python3
"""Times the server at the real V4-Flash width with dummy weights and reduced depth.

Makes a model dir with the V4-Flash config cut to --layers layers (first layer kinds kept, so
sliding, CSA and HCA layers are all present) and the repo's tokenizer, starts
`dspark-server serve --load-format dummy` on it, and reports single-stream decode tok/s and
prefill tok/s over the HTTP API. A quick probe; `dspark-server bench` is the full benchmark.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--server", required=True)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--device", default="cuda")
ap.add_argument("--world-size", type=int, default=1)
ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 8192])
ap.add_argument("--decode-tokens", type=int, default=32)
ap.add_argument("--port", type=int, default=8200)
a = ap.parse_args()

repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cfg = json.load(open(os.path.join(repo, "server/tests/fixtures/v4-flash-config.json")))
cfg["num_hidden_layers"] = a.layers
cfg["compress_ratios"] = cfg["compress_ratios"][: a.layers]
cfg["dspark_target_layer_ids"] = list(range(max(0, a.layers - 3), a.layers))
d = tempfile.mkdtemp(prefix="v4-flash-probe-")
json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
shutil.copy(os.path.join(repo, "server/assets/tiny-dsv4/tokenizer.json"), d)
pool = max(a.prompt_tokens) + a.decode_tokens + 1024
cmd = [a.server, "serve", "--model", d, "--load-format", "dummy", "--device", a.device,
       "--world-size", str(a.world_size), "--port", str(a.port), "--control-port", str(a.port + 100),
       "--kv-pool-tokens", str(pool), "--max-model-len", str(pool), "--max-num-batched-tokens", "8192"]
log = open(f"/tmp/probe-{a.port}.log", "w")
t0 = time.time()
p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
base = f"http://127.0.0.1:{a.port}"
while True:
    try:
        urllib.request.urlopen(base + "/ready", timeout=2)
        break
    except Exception:
        if p.poll() is not None or time.time() - t0 > 900:
            print(open(f"/tmp/probe-{a.port}.log").read()[-3000:]); sys.exit(1)
        time.sleep(1)
print(f"ready after {time.time() - t0:.1f}s (layers={a.layers}, device={a.device}, world={a.world_size})")

def complete(prompt_ids, max_tokens):
    body = json.dumps({"model": os.path.basename(d), "prompt": prompt_ids, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"content-type": "application/json"})
    start = time.time(); first = None; n = 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                if first is None: first = time.time()
                n += 1
    return first - start, time.time() - first, n

try:
    for P in a.prompt_tokens:
        ids = [(i * 7919) % 120000 + 100 for i in range(P)]
        ttft, rest, n = complete(ids, a.decode_tokens)
        print(f"prompt {P:>7}: TTFT {ttft*1e3:9.1f} ms ({P/ttft:8.0f} tok/s prefill), "
              f"decode {max(n-1,1)/rest:7.2f} tok/s over {n} chunks")
finally:
    p.terminate(); p.wait(60)
    print("server log tail:"); print("".join(open(f"/tmp/probe-{a.port}.log").readlines()[-6:]))
