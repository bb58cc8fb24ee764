"""PyTorch's kernels on the shapes of benches/ops.rs (idefics-9b, GPU): torch.nn.functional.linear (cuBLAS) for every
linear-layer shape at M = 1, 16, 128, 2048, scaled_dot_product_attention with the flash backend for causal prefill at
512/2k/8k and for decode, and transformers' own IdeficsPerceiverResampler and IdeficsGatedCrossAttentionLayer modules.
bf16 on CUDA, random inputs (never zeros), CUDA-event timing, median of --repeats after warm-up.

Prints one JSON object {bench id: milliseconds}; the ids are those criterion prints for benches/ops.rs
(`group/function`), so scripts/device-bench.sh can set both side by side.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, I, V, DV, MV, INNER = 4096, 11008, 32000, 1280, 5120, 16 * 96
HEADS, D = 32, 128
LINEAR = [("attn_qkvo", H, H), ("mlp_gate_up", I, H), ("mlp_down", H, I), ("lm_head", V, H),
          ("xattn_kv", H, DV), ("vision_qkvo", DV, DV), ("vision_fc1", MV, DV), ("vision_fc2", DV, MV),
          ("perceiver_qkv", INNER, DV), ("perceiver_out", DV, INNER)]


def ms(fn, repeats):
    """Median of `repeats` CUDA-event-timed runs after three warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def linear(out, repeats):
    group = "linear_bf16/idefics-9b"
    for name, n, k in LINEAR:
        w = rand(n, k) * k ** -0.5
        for m in (1, 16, 128, 2048):
            x = rand(m, k)
            out[f"{group}/{name}_{n}x{k}/m{m}"] = ms(lambda: F.linear(x, w), repeats)


def attention(out, repeats):
    group = "attention/idefics-9b"
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for s in (512, 2048, 8192):
            q, k, v = rand(1, HEADS, s, D), rand(1, HEADS, s, D), rand(1, HEADS, s, D)
            out[f"{group}/prefill_causal/{s}"] = ms(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
        for b, c in ((1, 512), (1, 8192), (32, 1024), (128, 1024)):
            q, k, v = rand(b, HEADS, 1, D), rand(b, HEADS, c, D), rand(b, HEADS, c, D)
            out[f"{group}/decode_paged/{b}x{c}"] = ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats)


def modules(out, repeats):
    """transformers' resampler (6 blocks, one image) and one gated cross-attention block (64 prompt rows)."""
    from transformers import IdeficsConfig
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    with open("assets/configs/idefics-9b.json") as f:
        cfg = IdeficsConfig(**json.load(f))
    cfg._attn_implementation = "sdpa"
    p = cfg.perceiver_config
    with torch.device("cuda"):
        resampler = IdeficsPerceiverResampler(cfg, DV, p.resampler_depth, p.resampler_n_heads,
                                              p.resampler_head_dim, p.resampler_n_latents).to(torch.bfloat16)
        block = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).to(torch.bfloat16)
    for param in block.parameters():
        if param.numel() == 1:
            param.data.fill_(0.5)  # non-zero gates, as in the synthetic models (checkpoints start them at 0)
    context = rand(1, 257, DV)
    hidden, images = rand(1, 64, H), rand(1, 64, DV)
    mask = torch.zeros(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    gate = torch.ones(1, 64, device="cuda", dtype=torch.bfloat16)  # [batch, rows]: every row sees the image
    with torch.inference_mode():
        out["modules/idefics-9b/resampler"] = ms(lambda: resampler(context), repeats)
        out["modules/idefics-9b/gated_cross_attention_block/64"] = ms(
            lambda: block(hidden, image_hidden_states=images, image_attention_mask=mask,
                          cross_attention_gate=gate), repeats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    out = {}
    linear(out, args.repeats)
    attention(out, args.repeats)
    modules(out, args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
