"""The GPU benchmark of issue 15, for one short run on a GPU machine (benchmarks/gpu_check.sh runs it).

On a Llama-3-8B-shaped model with random bf16 weights made on the GPU (no download): this GPU's bf16
matmul peak and copy bandwidth, measured first; splitfuse's decode step time at batch 1, 8, 64 and 256
(against weights / bandwidth and FLOPs / peak), prefill throughput at 2k and 8k tokens, the offline
mixed set's throughput; and HF transformers on the same weights, same GPU, same run. Prints one JSON
object and writes it to --out.

    python benchmarks/gpu_bench.py --out $OUT/gpu_bench.json [--layers 32] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_LENGTHS = (2048, 8192)


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def machine_limits() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul = timed(lambda: a @ b, 10)
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), 10)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": 2 * n ** 3 / matmul / 1e12, "copy_bandwidth_gbs": 2 * (4 << 30) / copy / 1e9}


def make_checkpoint(path: str, layers: int) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import transformers

    from splitfuse.checkpoint_factory import train_tokenizer

    config = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(path)
    train_tokenizer(512).save_pretrained(path)  # prompts are token ids; the tokenizer only has to load
    del model
    torch.cuda.empty_cache()
    return path


def num_parameters(layers: int) -> int:
    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * 128
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return layers * per_layer + 2 * SHAPE["vocab_size"] * h + h


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 30000) for _ in range(length)] for _ in range(count)]


def mixed_set(seed: int = 0) -> list[tuple[list[int], int]]:
    """256 requests: prompts 64..2048 tokens, outputs 16..512 (log-uniform), as the CPU mixed set is shaped."""
    rng = random.Random(seed)
    requests = []
    for _ in range(256):
        prompt_len = int(2 ** rng.uniform(6, 11))
        output_len = int(2 ** rng.uniform(4, 9))
        requests.append(([rng.randrange(10, 30000) for _ in range(prompt_len)], output_len))
    return requests


def splitfuse_figures(path: str) -> dict:
    from splitfuse.entrypoints.llm import LLM
    from splitfuse.sampling_params import SamplingParams

    llm = LLM(model=path, dtype="bfloat16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
              max_model_len=8192 + 16)
    engine = llm.engine
    figures: dict = {"decode_step_ms": {}, "prefill_tok_s": {}}
    for batch in DECODE_BATCHES:
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for i, prompt in enumerate(random_prompts(batch, 128, batch)):
            engine.add_request(f"d{batch}-{i}", prompt, params)
        engine.step()
        while engine.get_stats().num_waiting:  # prefill until every request runs
            engine.step()
        for _ in range(4):  # the last prompt chunks done, decodes under way
            engine.step()
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 32
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        figures["decode_step_ms"][batch] = (time.perf_counter() - start) / steps * 1e3
        while engine.has_unfinished_requests():
            engine.step()
    for length in PREFILL_LENGTHS:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(random_prompts(1, length, 1), params, use_tqdm=False)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(random_prompts(1, length, 2), params, use_tqdm=False)
        torch.cuda.synchronize()
        figures["prefill_tok_s"][length] = length / (time.perf_counter() - start)
    requests = mixed_set()
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests],
                           [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests],
                           use_tqdm=False)
    seconds = time.perf_counter() - start
    figures["mixed_output_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outputs) / seconds
    figures["mixed_seconds"] = seconds
    runner = engine.engine_core.executor.runner
    figures["kv_blocks"] = runner.num_blocks
    figures["attention_backend"] = type(runner.backend).__name__
    figures["cuda_graphs"] = None if runner.graphs is None else list(runner.graphs.sizes)
    engine.shutdown()
    return figures


def transformers_figures(path: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    figures: dict = {"decode_step_ms": {}}
    for batch in (1, 8, 64):
        prompts = torch.tensor(random_prompts(batch, 128, batch), device="cuda")

        def run(new_tokens: int):
            model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
        short, long = timed(lambda: run(1), 2), timed(lambda: run(33), 2)
        figures["decode_step_ms"][batch] = (long - short) / 32 * 1e3
    requests = mixed_set()
    start, generated = time.perf_counter(), 0
    for first in range(0, len(requests), 32):  # batches of 32, left-padded, as a transformers user would
        batch = requests[first:first + 32]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
        longest = max(n for _, n in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=0)
        generated += sum(n for _, n in batch)  # the tokens the requests asked for (extra ones are waste)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    figures["mixed_output_tok_s"] = generated / seconds
    figures["mixed_seconds"] = seconds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--checkpoint", default="/tmp/llama3-8b-random")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name(), "layers": args.layers}
    result["limits"] = limits = machine_limits()
    path = make_checkpoint(args.checkpoint, args.layers)
    params = num_parameters(args.layers)
    weight_bytes = 2 * params
    result["weights_gb"] = weight_bytes / 1e9
    result["splitfuse"] = ours = splitfuse_figures(path)
    # Decode limits: batch 1 reads every weight once (the lm_head included); batch B does 2 x params x B FLOPs.
    result["decode_limits_ms"] = {b: max(weight_bytes / (limits["copy_bandwidth_gbs"] * 1e9),
                                         2 * params * b / (limits["bf16_matmul_tflops"] * 1e12)) * 1e3
                                  for b in DECODE_BATCHES}
    result["batch1_of_bandwidth_limit"] = result["decode_limits_ms"][1] / ours["decode_step_ms"][1]
    result["batch256_of_matmul_limit"] = (2 * params * 256 / (limits["bf16_matmul_tflops"] * 1e12) * 1e3
                                          / ours["decode_step_ms"][256])
    if not args.skip_transformers:
        result["transformers"] = theirs = transformers_figures(path)
        result["mixed_vs_transformers"] = ours["mixed_output_tok_s"] / theirs["mixed_output_tok_s"]
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
