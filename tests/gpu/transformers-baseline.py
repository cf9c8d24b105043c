#!/usr/bin/env python3
"""transformers eager DeepseekV4ForCausalLM at the V4-Flash width and reduced depth, bf16, random
weights, on the GPU: prefill and greedy decode speed, for a side-by-side with dspark
(tests/gpu/shape-probe.py with the same --layers and prompt length)."""
import argparse, json, os, time
import torch, transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--prompt-tokens", type=int, default=512)
ap.add_argument("--decode-tokens", type=int, default=32)
a = ap.parse_args()
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
c = json.load(open(os.path.join(repo, "server/tests/fixtures/v4-flash-config.json")))
c["num_hidden_layers"] = a.layers
c["compress_ratios"] = c["compress_ratios"][: a.layers]
cfg = DeepseekV4Config(**{k: v for k, v in c.items()
                          if k not in ("architectures", "quantization_config", "model_type")})
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    model = DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).eval()
print(f"transformers {transformers.__version__}, torch {torch.__version__}: built {a.layers} layers "
      f"in {time.time()-t0:.1f}s, {sum(p.numel() for p in model.parameters())/1e9:.2f}B params")
ids = torch.tensor([[(i * 7919) % 120000 + 100 for i in range(a.prompt_tokens)]], device="cuda")
with torch.no_grad():
    model.generate(ids[:, :16], max_new_tokens=2, do_sample=False)  # warm-up
    torch.cuda.synchronize(); t = time.time()
    out = model(ids, use_cache=True)
    torch.cuda.synchronize(); ttft = time.time() - t
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(); t = time.time()
    for _ in range(a.decode_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(); dec = time.time() - t
print(f"transformers eager bf16, layers={a.layers}: prompt {a.prompt_tokens}: TTFT {ttft*1e3:.1f} ms "
      f"({a.prompt_tokens/ttft:.0f} tok/s prefill), decode {a.decode_tokens/dec:.2f} tok/s")
