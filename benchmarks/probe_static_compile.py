"""Static-cache generate() of a tiny random Llama with flashattn_custom, compiled by Transformers, on the GPU: prints
`static OK` and the last tokens, or the error chain of a failed compile (Inductor's compile threads set to 1 so that the
chain is whole) and copies Inductor's generated module that holds `_decode_kernel` to $OUT. The seventeenth session's
reproduction of the failure in `results/2026-11-27-h100-decode-static-compile-error.md`.

    python benchmarks/probe_static_compile.py [ROOT]     (ROOT: a tree holding hf_flashattn/, e.g. a `git archive`)
"""
import sys, os, traceback, time
root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/ind2_{os.path.basename(os.path.abspath(root))}"
import torch
import hf_flashattn
print("using", hf_flashattn.__file__, flush=True)
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, head_dim=32)
ids = torch.randint(1, 1000, (1, 300), device="cuda")
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="flashattn_custom", dtype=torch.bfloat16).cuda().eval()
t0 = time.time()
try:
    out = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    print("static OK", out[0, -6:].tolist(), f"{time.time()-t0:.1f}s", flush=True)
except Exception:
    print("static FAILED", flush=True)
    s = traceback.format_exc()
    import re, glob, shutil
    lines = s.splitlines()
    for i, l in enumerate(lines):
        if re.match(r"\s*(triton\.compiler\.errors\.\w+|CompilationError|ValueError|.*Error:)", l) or l.strip().startswith("at "):
            print("\n".join(lines[max(0, i - 2):i + 14]))
            print("-----")
    out = os.environ.get("OUT", "/tmp")
    for f in glob.glob(os.environ["TORCHINDUCTOR_CACHE_DIR"] + "/**/*.py", recursive=True):
        if "_decode_kernel" in open(f).read():
            shutil.copy(f, os.path.join(out, "inductor_" + os.path.basename(f)))
