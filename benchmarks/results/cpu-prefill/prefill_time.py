"""Time one kvtier prefill of a 12K-token natural prompt on SmolLM2 (CPU), in niah's forwards."""
import sys
if len(sys.argv) > 2:
    sys.meta_path = [f for f in sys.meta_path if "editable" not in str(f).lower()]
    sys.path.insert(0, sys.argv[2])
import sys, time, torch
from kvtier import ReAttentionCache
from kvtier.tools.model import load_smollm2
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.tasks import build_task_sample
model, tok = load_smollm2(dtype=torch.float32, device="cpu")
s = build_task_sample(tokenized_corpus(tok), 12288, 0.5, "niah_single", draw="0:12288:0.5:0")
ids = torch.tensor([s.ids])
chunk = int(sys.argv[1])
for rep in range(2):
    cache = ReAttentionCache(model)
    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start:start+chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    print(f"rep {rep}: {time.perf_counter()-t:.1f} s for {ids.shape[1]} tokens in {chunk}-token forwards", flush=True)
