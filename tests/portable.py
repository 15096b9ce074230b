"""Load saved directories the way a user without planner does: a fresh Python process (any interpreter, e.g.
another virtual environment with another transformers release) in which `import planner` fails, loading through
`from_pretrained(dir, trust_remote_code=True)` only."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = r"""
import sys, torch, transformers
sys.modules["planner"] = None                      # any `import planner` now fails
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
job = torch.load(sys.argv[1])
got = {"transformers": transformers.__version__}
for name, d in job["dirs"].items():
    causal = "AutoModelForCausalLM" in (AutoConfig.from_pretrained(d, trust_remote_code=True).auto_map or {})
    m = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(d, trust_remote_code=True).eval()
    r = {"cls": type(m).__name__, "layers": m.config.planner_layers}
    x = job["inputs"]
    with torch.no_grad():
        if causal:
            r["logits"] = m(**x, use_cache=False).logits
            ids, mask, n, pad = job["prompt"]["input_ids"], job["prompt"]["attention_mask"], job["new_tokens"], job["pad"]
            r["gen"] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
            for _ in range(n):                     # the same greedy decoding without a KV cache
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                nxt = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            r["loop"] = ids
        else:
            r["hidden"] = m(**x).last_hidden_state
    got[name] = r
torch.save(got, sys.argv[2])
"""


def load_without_planner(dirs: dict[str, str | Path], inputs: dict, work: Path, prompt: dict | None = None,
                         new_tokens: int = 8, pad: int = 0, python: str | None = None) -> dict:
    """{name: {"cls", "layers", "logits"/"hidden", causal LMs also "gen" (generate() with the KV cache) and "loop"
    (greedy without cache)}, "transformers": version} from a fresh `python` process without planner."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    job, out, script = work / "job.pt", work / "got.pt", work / "load_without_planner.py"
    torch.save({"dirs": {k: str(v) for k, v in dirs.items()}, "inputs": inputs, "prompt": prompt or inputs,
                "new_tokens": new_tokens, "pad": pad}, job)
    script.write_text(_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([python or sys.executable, str(script), str(job), str(out)], cwd=work, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)
