# Helpers of the GPU server checks (sourced by cuda-checks.sh and long-prompt-tp2.sh): start a
# server on the tiny model, ask it for a greedy completion, stop it. Needs $server (the binary)
# and sets nothing else.
step() { printf '\n==> %s\n' "$*"; }

complete() { # port [prompt] -> greedy completion text (24 tokens) of the prompt
  python3 - "$1" "${2:-The capital of France is}" <<'PY'
import json, sys, urllib.request
port, prompt = sys.argv[1], sys.argv[2]
body = json.dumps({"model": "tiny-dsv4", "prompt": prompt, "max_tokens": 24, "temperature": 0})
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                             {"content-type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]["text"])
PY
}

serve() { # port device world extra... ; waits for /ready
  local port=$1 device=$2 world=$3; shift 3
  "$server" serve --device "$device" --world-size "$world" --port "$port" \
    --control-port $((port + 100)) --kv-pool-tokens 4096 "$@" > "/tmp/dspark-$port.log" 2>&1 &
  echo $! > "/tmp/dspark-$port.pid"
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    kill -0 "$(cat /tmp/dspark-$port.pid)" 2>/dev/null || break
    sleep 0.5
  done
  echo "server on $port ($device, world $world) did not become ready:"; tail -20 "/tmp/dspark-$port.log"
  return 1
}

stop() { kill -TERM "$(cat /tmp/dspark-$1.pid)" 2>/dev/null; wait "$(cat /tmp/dspark-$1.pid)" 2>/dev/null; }
