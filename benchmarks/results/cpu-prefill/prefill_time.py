"""Time kvtier prefills of one 12K-token natural prompt on SmolLM2 (CPU, float32) in `chunk`-token forwards:
`python prefill_time.py CHUNK [--profile] [PACKAGE_DIR]`. --profile runs the prompt's last forward under the torch
profiler instead of timing two prefills; PACKAGE_DIR loads kvtier from that folder (a copy of an older commit's
kvtier/ with policies/ and kernels/ inside it) instead of the installed one (RESULTS 23f)."""
import sys

args = [arg for arg in sys.argv[1:] if arg != "--profile"]
if len(args) > 1:
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in str(finder).lower()]
    sys.path.insert(0, args[1])

import time  # noqa: E402

import torch  # noqa: E402

from kvtier import ReAttentionCache  # noqa: E402
from kvtier.tools.corpus import tokenized_corpus  # noqa: E402
from kvtier.tools.model import load_smollm2  # noqa: E402
from kvtier.tools.tasks import build_task_sample  # noqa: E402

model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
sample = build_task_sample(tokenized_corpus(tokenizer), 12288, 0.5, "niah_single", draw="0:12288:0.5:0")
ids = torch.tensor([sample.ids])  # [1, 12288]
chunk = int(args[0])


def forward(cache, start: int) -> None:
    model(ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)


with torch.inference_mode():
    if "--profile" in sys.argv:
        cache, last = ReAttentionCache(model), ids.shape[1] - chunk
        for start in range(0, last, chunk):
            forward(cache, start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            began = time.perf_counter()
            forward(cache, last)
            print(f"last forward {time.perf_counter() - began:.2f} s")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    else:
        for rep in range(2):
            cache, began = ReAttentionCache(model), time.perf_counter()
            for start in range(0, ids.shape[1], chunk):
                forward(cache, start)
            print(f"rep {rep}: {time.perf_counter() - began:.1f} s for {ids.shape[1]} tokens in {chunk}-token forwards")
