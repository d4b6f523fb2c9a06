"""GRPO on one CUDA GPU with vLLM generation colocated with the trainer, against posttrain's own HF decoding
loop (issue 17's GPU item). Prepared for a GPU session: it has not run yet (no GPU in this project's sessions so
far), so expect to fix the first run.

    python benchmarks/gpu_grpo.py --steps 8 --record

What runs, offline (the GPU machine reaches no hub):

1. A model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads, vocab 151,936, tied embeddings:
   494M parameters), randomly initialised, saved with the toy kit's tokenizer (its ids are a prefix of the
   vocabulary) in a temporary directory; the toy kit's prompts.
2. GRPO from ``configs/grpo.yaml`` for ``--steps`` steps, bf16 autocast over float32 master weights, 16 prompts x
   8 samples a step, 64 new tokens: once with ``sampling.engine=hf`` and once with ``sampling.engine=vllm``
   (``sampling.vllm.sleep=true``: the engine sleeps, its KV cache freed, while the trainer updates; colocated in the
   trainer's process). From metrics.jsonl: samples/s and generated tokens/s of the rollout (``rollout_wait_s``),
   the weight sync per step (``weight_sync_s``), peak GPU memory; the vLLM/HF ratio of samples/s.
3. Weights after a sync: the policy moved by a random step, synced into a vLLM engine, and every vLLM parameter
   compared with the policy's (q/k/v and gate/up concatenated as vLLM fuses them), in vLLM's dtype: the count of
   tensors that are not bit-identical must be 0.

The last line printed is one JSON object; ``--record`` writes it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit_results, qwen_shaped_model


def build_model(root: Path) -> tuple[Path, Path]:
    """The model directory and the prompts file."""
    from posttrain.toy import build_toy

    kit = build_toy(root / "kit", size="tiny", seed=0, sft=10, prefs=10, prompts=500, eval=50, pretrain=10)
    return qwen_shaped_model(kit.model, root / "qwen-shaped"), kit.prompts


def grpo(model_dir: Path, prompts: Path, out: Path, engine: str, steps: int) -> dict[str, Any]:
    import torch

    from posttrain.config import load_config
    from posttrain.recipes import ppo

    overrides = [
        f"model.path={model_dir}",
        f"data.train={prompts}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.precision=bf16",
        "train.batch_size=32",
        "train.grad_accum=2",
        "train.eval_every=1000",
        "algorithm.prompts_per_step=16",
        "sampling.num_samples=8",
        "sampling.max_new_tokens=64",
        "sampling.batch_size=128",
        "reward.function=toy",
        "logging.progress=false",
        f"sampling.engine={engine}",
    ]
    if engine == "vllm":
        overrides += ["sampling.vllm.sleep=true", "sampling.vllm.gpu_memory_utilization=0.3"]
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    ppo.run(load_config("posttrain/configs/grpo.yaml", overrides))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "rollout_wait_s" in r][1:]  # the first step warms up (compile, caches)
    rollout_s = sum(r["rollout_wait_s"] for r in steps_logged)
    samples = 16 * 8 * len(steps_logged)
    tokens = sum(r["response_length"] * 16 * 8 for r in steps_logged)
    return {
        "engine": engine,
        "samples_per_s": round(samples / rollout_s, 1),
        "generated_tokens_per_s": round(tokens / rollout_s, 1),
        "weight_sync_s_per_step": round(sum(r["weight_sync_s"] for r in steps_logged) / len(steps_logged), 4),
        "step_s": round(sum(r["step_time_s"] for r in steps_logged) / len(steps_logged), 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "wall_s": round(time.time() - started, 1),
    }


def weights_after_sync(model_dir: Path) -> dict[str, Any]:
    """A moved policy synced into vLLM; vLLM's parameters against the policy's, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.vllm import VllmEngine

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    engine = VllmEngine(str(model_dir), [0], dtype="bfloat16", gpu_memory_utilization=0.3)
    started = time.perf_counter()
    engine.sync_weights(policy)
    torch.cuda.synchronize()
    sync_s = time.perf_counter() - started
    ours = dict(policy.state_dict())
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    compared, different = 0, []
    for name, tensor in engine._vllm_model().named_parameters():
        parts = next(((key, sources) for key, sources in fused.items() if key in name), None)
        if parts is None:
            expected = ours.get(name)
        else:
            expected = torch.cat([ours[name.replace(parts[0], source)] for source in parts[1]], dim=0)
        if expected is None:
            different.append(f"{name}: no such parameter in the policy")
            continue
        compared += 1
        if not torch.equal(tensor.detach(), expected.to(tensor.dtype)):
            different.append(name)
    return {
        "tensors_compared": compared,
        "tensors_not_identical": len(different),
        "first": different[:5],
        "sync_s": sync_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per engine (the first is not timed)")
    parser.add_argument("--record", action="store_true", help="write the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu_grpo-") as scratch:
        root = Path(scratch)
        model_dir, prompts = build_model(root)
        runs = [grpo(model_dir, prompts, root / engine, engine, args.steps) for engine in ("hf", "vllm")]
        for run in runs:
            print(json.dumps(run))
        identity = weights_after_sync(model_dir)
    hf, vllm = runs
    out = {
        "steps": args.steps,
        "hf_samples_per_s": hf["samples_per_s"],
        "vllm_samples_per_s": vllm["samples_per_s"],
        "vllm_over_hf": round(vllm["samples_per_s"] / hf["samples_per_s"], 2),
        "vllm_weight_sync_s_per_step": vllm["weight_sync_s_per_step"],
        "weights_not_identical_after_sync": identity["tensors_not_identical"],
        "weights": identity,
        "runs": runs,
    }
    emit_results(out, args.record)


if __name__ == "__main__":
    main()
