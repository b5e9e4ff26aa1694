import sys
if len(sys.argv) > 1:
    sys.meta_path = [f for f in sys.meta_path if "editable" not in str(f).lower()]
    sys.path.insert(0, sys.argv[1])
import time, torch
from kvtier import ReAttentionCache
from kvtier.tools.model import load_smollm2
from kvtier.tools.corpus import tokenized_corpus
from kvtier.tools.tasks import build_task_sample
model, tok = load_smollm2(dtype=torch.float32, device="cpu")
s = build_task_sample(tokenized_corpus(tok), 12288, 0.5, "niah_single", draw="0:12288:0.5:0")
ids = torch.tensor([s.ids])
cache = ReAttentionCache(model)
with torch.inference_mode():
    for start in range(0, 10240, 2048):
        model(ids[:, start:start+2048], past_key_values=cache, use_cache=True, logits_to_keep=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model(ids[:, 10240:12288], past_key_values=cache, use_cache=True, logits_to_keep=1)
        print(f"last forward {time.perf_counter()-t:.2f} s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
