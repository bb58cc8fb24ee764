"""transformers' IDEFICS (IdeficsForVisionText2Text, PyTorch eager or sdpa) timed on the workload of `flamingo bench`:
one image + N random text tokens. Prints one JSON object:

  {"image_ms": vision encoder + perceiver resampler, one image,
   "prefill_ms": forward of the whole prompt with its image, to the last token's logits,
   "decode_ms_per_token": greedy generation, (time of 1 + D new tokens - time of 1) / D,
   "threads", "device", "dtype", "torch", "transformers"}

The model is built from a config.json with random weights (the time does not depend on their values). Medians of
--repeats runs after one warm-up. Used by scripts/cpu-vs-torch.sh (CPU, f32) and scripts/device-bench.sh (CUDA, bf16).
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import IdeficsConfig, IdeficsForVisionText2Text


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="config.json of the model to build")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, repeats, device):
    """Median wall time of fn() in ms over `repeats` runs after one warm-up, synchronised on both sides."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def build(args):
    with open(args.config) as f:
        cfg = IdeficsConfig(**json.load(f))
    cfg._attn_implementation = args.attn
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = IdeficsForVisionText2Text(cfg).to(dtype)
    return model.eval(), cfg


def inputs(cfg, args):
    """<s><fake><image><fake> + random text ids; every token from the image on sees it (the engine's rule)."""
    g = torch.Generator().manual_seed(0)
    image_id, fake_id = cfg.vocab_size, cfg.vocab_size + 1  # additional tokens, never drawn as text
    text = torch.randint(3, cfg.vocab_size, (args.prompt_tokens,), generator=g)
    ids = torch.cat([torch.tensor([1, fake_id, image_id, fake_id]), text]).unsqueeze(0)
    mask = torch.zeros(1, ids.shape[1], 1, dtype=torch.long)
    mask[0, 2:, 0] = 1
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 1, 3, size, size, generator=g)
    dtype = getattr(torch, args.dtype)
    return ids.to(args.device), mask.to(args.device), pixels.to(args.device, dtype)


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, cfg = build(args)
    ids, image_mask, pixels = inputs(cfg, args)
    inner = model.model

    def image():
        states = inner.vision_model(pixel_values=pixels[:, 0]).last_hidden_state
        return inner.perceiver_resampler(states)

    def prefill():
        return model(input_ids=ids, pixel_values=pixels, image_attention_mask=image_mask, use_cache=True).logits

    def generate(n):
        return lambda: model.generate(
            input_ids=ids,
            pixel_values=pixels,
            image_attention_mask=image_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        image_ms = median_ms(image, args.repeats, args.device)
        prefill_ms = median_ms(prefill, args.repeats, args.device)
        one = median_ms(generate(1), args.repeats, args.device)
        many = median_ms(generate(1 + args.decode_tokens), args.repeats, args.device)
    print(json.dumps({
        "image_ms": image_ms,
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": (many - one) / args.decode_tokens,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
