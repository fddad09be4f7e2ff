"""Long-context fine-tuning with attn_implementation="flashattn_custom": LoRA (peft) or full, packed documents
without cross-document attention, activation checkpointing, bf16 on GPU, checkpoint save and resume.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/finetune_long_context.py
        (offline default: a tiny random Llama learns synthetic passkey retrieval; nothing is downloaded)
        --model-preset 1b --seq-len 32768 --min-len 32768 --batch-size 1   (~1B model, 32k-token documents)
        --attn-implementation sdpa --sdpa-backend cudnn   (the same run's baseline; or eager)
        --max-steps 1000 --resume-from latest   (continue from the newest checkpoint in --output-dir)
        --model meta-llama/Llama-3.2-1B --dataset pg19   (or --dataset my.jsonl / .parquet / .txt)
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml ...       (several GPUs, FSDP2)
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/finetune_long_context.py \
        --seq-len 64 --batch-size 2 --max-steps 4 --eval-samples 4   (CPU smoke: Triton's interpreter is slow)

Packing: DataCollatorWithFlattening concatenates a step's --batch-size documents into one row whose
position_ids restart at 0 per document (plus cu_seq_lens_* for flash implementations): flashattn_custom
makes one varlen call, sdpa/eager get Transformers' block-diagonal mask; no document sees another.
Passkey task, in token ids (no tokenizer): BOS, filler, KEY, the passkey's digits at a random depth, filler,
QUERY, the digits again, EOS. Labels are on the answer only (digits and EOS): the loss starts near
ln(vocab), falls to about 0.8 ln(10) = 1.84 once the answer's format is learnt, then towards 0 as retrieval
is learnt. Retrieval accuracy on held-out documents: argmax of each answer digit given the true prefix
(exact match over all digits = greedy generation gets the passkey right).
Output: a progress bar, a log line every --log-every steps, a final JSON line (and --metrics-out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import time

import hf_flashattn  # noqa: F401  (before transformers: registers "flashattn_custom", picks the interpreter on CPU)
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed, tqdm
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, LlamaConfig, get_scheduler

PAD, BOS, EOS, KEY, QUERY, DIGIT0 = 0, 1, 2, 3, 4, 5  # digits are 5..14, filler 15..vocab-1
FIRST_FILLER = DIGIT0 + 10
PRESETS = {  # "1b": Llama-3.2-1B's body (16 layers, 2048 hidden, 32/8 heads of 64) with the task's small vocab
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
}
ROPE_THETA = {"tiny": 10000.0, "1b": 500000.0}
SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="Hub name or path of a causal LM (default: a random Llama of --model-preset)")
    a("--model-preset", choices=sorted(PRESETS), default="tiny")
    for key in PRESETS["tiny"]:
        a("--" + key.replace("_", "-"), dest=key, type=int, help="override the preset")
    a("--rope-theta", type=float, help="of the random model (default: 1e4 tiny, 5e5 1b)")
    a("--vocab-size", type=int, default=64, help="of the random model (above every token id) and the passkey task")
    a("--attn-implementation", default="flashattn_custom", help="flashattn_custom, sdpa, eager, ...")
    a("--sdpa-backend", choices=["auto", *SDPA], default="auto", help="try this SDPA backend first (sdpa runs)")
    a("--dataset", default="passkey", help="'passkey' (synthetic), a Hub dataset, a .jsonl/.json/.parquet/.txt")
    a("--dataset-config")
    a("--split", default="train")
    a("--text-field", default="text")
    a("--tokenizer", help="for text datasets (default: --model)")
    a("--seq-len", type=int, default=512, help="longest document in tokens (text is truncated to it)")
    a("--min-len", type=int, help="shortest passkey document (default: seq_len // 2)")
    a("--passkey-digits", type=int, default=4)
    a("--batch-size", type=int, default=8, help="documents packed into one row, per step and process")
    a("--grad-accum", type=int, default=1)
    a("--max-steps", type=int, default=600, help="optimizer steps")
    a("--lr", type=float, default=3e-3)
    a("--warmup-steps", type=int, default=10)
    a("--full-finetune", action="store_true", help="train every weight instead of LoRA adapters")
    a("--lora-r", type=int, default=16)
    a("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    a("--eval-samples", type=int, default=64, help="held-out passkey documents for retrieval accuracy")
    a("--output-dir", default="runs/finetune_long_context")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    a("--no-save", dest="save", action="store_false", help="write no checkpoint (benchmarks)")
    a("--resume-from", help="a checkpoint-<step> directory, or 'latest' (in --output-dir)")
    a("--log-every", type=int, default=50)
    a("--timing-warmup", type=int, default=2, help="first steps left out of tokens/s (compilation, autotuning)")
    a("--metrics-out", help="write the summary and the per-step losses to this JSON file")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.min_len = args.min_len or args.seq_len // 2
    if args.dataset == "passkey" and not 2 * args.passkey_digits + 4 <= args.min_len <= args.seq_len:
        p.error(f"--min-len {args.min_len} must lie in [{2 * args.passkey_digits + 4}, --seq-len {args.seq_len}]")
    return args


def passkey_document(index: int, args) -> dict:
    """Document `index`, a function of (seed, index) only: any dataset size has the same first documents."""
    rng = np.random.default_rng([args.seed, index])
    k = args.passkey_digits
    filler = rng.integers(FIRST_FILLER, args.vocab_size, int(rng.integers(args.min_len, args.seq_len + 1)) - 2 * k - 4)
    depth = int(rng.integers(0, len(filler) + 1))
    key = DIGIT0 + rng.integers(0, 10, k)
    ids = np.concatenate([[BOS], filler[:depth], [KEY], key, filler[depth:], [QUERY], key, [EOS]])
    labels = np.full_like(ids, -100)
    labels[-k - 1:] = ids[-k - 1:]
    return {"input_ids": ids, "labels": labels}


def text_dataset(args):
    from datasets import load_dataset  # only here: the passkey task is a plain list and runs without `datasets`

    if os.path.exists(args.dataset):
        ext = os.path.splitext(args.dataset)[1].lstrip(".")
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text"}.get(ext)
        if builder is None:
            raise SystemExit(f"--dataset {args.dataset}: expected a .jsonl, .json, .parquet or .txt file")
        ds = load_dataset(builder, data_files=args.dataset, split=args.split)
    else:
        ds = load_dataset(args.dataset, args.dataset_config, split=args.split)
    if "input_ids" not in ds.column_names:  # a pre-tokenized dataset is used as it is
        if not (args.tokenizer or args.model):
            raise SystemExit("a text dataset needs a tokenizer: pass --model NAME or --tokenizer NAME")
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        args.vocab_size = max(args.vocab_size, len(tok))  # for a random model
        ds = ds.map(lambda b: tok(b[args.text_field], truncation=True, max_length=args.seq_len), batched=True,
                    remove_columns=ds.column_names, desc="tokenizing")
    return ds.filter(lambda ex: len(ex["input_ids"]) > 1).shuffle(seed=args.seed)


def build_model(args, device: torch.device):
    # frozen LoRA base weights in bf16 on GPU; trained weights in fp32 (bf16 compute from mixed_precision)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.full_finetune else torch.float32
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, use_cache=False,
                                                    attn_implementation=args.attn_implementation)
    sizes = {**PRESETS[args.model_preset], **{k: getattr(args, k) for k in PRESETS["tiny"] if getattr(args, k)}}
    theta = args.rope_theta or ROPE_THETA[args.model_preset]
    config = LlamaConfig(**sizes, vocab_size=args.vocab_size, max_position_embeddings=args.seq_len, use_cache=False,
                         rope_parameters={"rope_type": "default", "rope_theta": theta},
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    with torch.device(device):  # initialise the random weights where they will train (1B on a CPU is slow)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn_implementation)


class TrainState:
    """What save_state/load_state carry besides model, optimizer, scheduler and RNGs (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.tokens = 0, 0

    def state_dict(self):
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd):
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])


def resolve_resume(path: str, output_dir: str) -> str:
    if path != "latest":
        return path
    steps = [int(m[1]) for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    if not steps:
        raise SystemExit(f"--resume-from latest: no checkpoint-<step> directory in {output_dir}")
    return os.path.join(output_dir, f"checkpoint-{max(steps)}")


def peak_memory_gib(accelerator) -> float:
    """Largest over processes (a collective: every process calls it)."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    else:  # peak resident set size of the process; Linux reports KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return accelerator.reduce(torch.tensor(peak, device=accelerator.device), "max").item()


@torch.no_grad()
def retrieval_accuracy(model, eval_dl, k: int, accelerator) -> dict:
    model.eval()
    exact, digits = [], []
    for batch in eval_dl:  # one document per batch, ending in QUERY, k digits, EOS
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=k + 2).logits
        hit = logits[0, :k].argmax(-1) == batch["input_ids"][0, -k - 1:-1]
        exact.append(hit.all().float()[None])
        digits.append(hit.float().mean()[None])
    model.train()
    exact, digits = (accelerator.gather_for_metrics(torch.cat(x)) for x in (exact, digits))
    return {"retrieval_exact_match": exact.mean().item(), "retrieval_digit_accuracy": digits.mean().item(),
            "eval_documents": len(exact)}


def train(args):
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    if args.dataset == "passkey":
        docs_per_step = args.batch_size * args.grad_accum * accelerator.num_processes
        train_ds = [passkey_document(i, args) for i in range(args.max_steps * docs_per_step)]
        eval_ds = [passkey_document(10**9 + i, args) for i in range(args.eval_samples)] or None
    else:
        train_ds, eval_ds = text_dataset(args), None
    set_seed(args.seed)  # before building the model: every FSDP rank starts from the same random weights
    model = build_model(args, accelerator.device)
    fsdp_ac = accelerator.distributed_type == "FSDP" and accelerator.state.fsdp_plugin.activation_checkpointing
    if args.activation_checkpointing and not fsdp_ac:  # under FSDP, its fsdp_activation_checkpointing does it
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full_finetune:
        from peft import LoraConfig, get_peft_model
        # a random model has no vocabulary worth keeping (and its frozen head could not give confident logits):
        # its embeddings and head train along with the adapters
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                          task_type="CAUSAL_LM", modules_to_save=None if args.model else ["embed_tokens", "lm_head"])
        model = get_peft_model(model, lora)
        for param in (p for p in model.parameters() if p.requires_grad):  # fp32, modules_to_save copies too
            param.data = param.data.float()
    attn = model.config._attn_implementation  # what Transformers really uses
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs="flash" in attn)  # sdpa/eager read position_ids
    loader = lambda ds, bs: torch.utils.data.DataLoader(ds, batch_size=bs, collate_fn=collate)  # noqa: E731
    train_dl = loader(train_ds, args.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    # a prepared scheduler steps once per process at each step, hence the factor (as in accelerate's examples)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_steps * accelerator.num_processes)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    eval_dl = accelerator.prepare(loader(eval_ds, 1)) if eval_ds is not None else None
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    resumed_from = resolve_resume(args.resume_from, args.output_dir) if args.resume_from else None
    if resumed_from:
        accelerator.load_state(resumed_from)
        accelerator.print(f"resumed from {resumed_from} at step {state.step}")
    start_step = state.step
    accelerator.print(f"{total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; attention {attn}; "
                      f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, {accelerator.device}")

    model.train()
    log, timed_tokens, t_start = [], 0, time.perf_counter() if args.timing_warmup == 0 else None
    loss_sum, step_tokens, rank_tokens = torch.zeros((), device=accelerator.device), 0, 0
    skip = state.step * args.grad_accum % len(train_dl)
    bar = tqdm(total=args.max_steps, initial=state.step, desc="training", main_process_only=True)
    while state.step < args.max_steps:
        for batch in accelerator.skip_first_batches(train_dl, skip) if skip else train_dl:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach()
            step_tokens += batch["input_ids"].numel()
            if not accelerator.sync_gradients:
                continue
            step_loss = accelerator.reduce(loss_sum, "mean").item() / args.grad_accum  # .item() waits for the GPU
            tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum").item())
            state.step, state.tokens, rank_tokens = state.step + 1, state.tokens + tokens, rank_tokens + step_tokens
            loss_sum.zero_()
            step_tokens = 0
            if state.step - start_step == args.timing_warmup:
                t_start, timed_tokens = time.perf_counter(), 0
            elif t_start is not None:
                timed_tokens += tokens
            tok_s = timed_tokens / (time.perf_counter() - t_start) if timed_tokens else float("nan")
            log.append({"step": state.step, "loss": step_loss, "tokens": tokens})
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:.0f}")
            if not math.isfinite(step_loss):
                raise SystemExit(f"step {state.step}: the loss is {step_loss}")
            if state.step % args.log_every == 0 or state.step == args.max_steps:
                peak = peak_memory_gib(accelerator)
                if accelerator.is_main_process:
                    bar.write(f"step {state.step} loss {step_loss:.4f} tokens/s {tok_s:.0f} peak_mem {peak:.2f}GiB "
                              f"lr {scheduler.get_last_lr()[0]:.2e}")
            if args.save and (state.step == args.max_steps or (args.save_every and state.step % args.save_every == 0)):
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{state.step}"))
            if state.step >= args.max_steps:
                break
        skip = 0
    bar.close()
    elapsed = time.perf_counter() - t_start if t_start else float("nan")

    per_rank = accelerator.gather(torch.tensor([rank_tokens], device=accelerator.device)).tolist()
    summary = {"recipe": "finetune_long_context", "model": args.model or f"random-llama-{args.model_preset}",
               "parameters": total, "trainable_parameters": trainable, "attn_implementation": attn,
               "sdpa_backend": args.sdpa_backend, "mode": "full" if args.full_finetune else "lora",
               "processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
               "mixed_precision": accelerator.mixed_precision,
               "device": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu",
               **{k: getattr(args, k) for k in ("activation_checkpointing", "seq_len", "min_len", "batch_size",
                                                "grad_accum")},
               "start_step": start_step, "final_step": state.step, "resumed_from": resumed_from,
               "first_loss": log[0]["loss"] if log else None,
               "final_loss": float(np.mean([r["loss"] for r in log[-10:]])) if log else None,  # last 10 steps
               "tokens_per_s": timed_tokens / elapsed if timed_tokens else None,
               "timed_steps": max(0, len(log) - args.timing_warmup), "tokens_seen": state.tokens,
               "tokens_per_process_this_run": per_rank, "peak_memory_gib": peak_memory_gib(accelerator),
               "peak_memory_kind": "cuda max_memory_allocated" if accelerator.device.type == "cuda" else "cpu max RSS",
               "checkpoint": os.path.join(args.output_dir, f"checkpoint-{state.step}") if args.save else None}
    if eval_dl is not None:
        summary.update(retrieval_accuracy(model, eval_dl, args.passkey_digits, accelerator))
    accelerator.print(json.dumps(summary))
    if accelerator.is_main_process and args.metrics_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.metrics_out)), exist_ok=True)
        with open(args.metrics_out, "w") as f:
            json.dump({**summary, "args": vars(args), "log": log}, f, indent=1)
    accelerator.end_training()


def main(argv=None):
    args = parse_args(argv)
    first = SDPA.get(args.sdpa_backend)  # None: "auto", PyTorch's own order
    order = [first] + [b for b in SDPA.values() if b != first]
    with sdpa_kernel(order, set_priority=True) if first else contextlib.nullcontext():
        train(args)


if __name__ == "__main__":
    main()
