"""Likelihood scoring the way OpenFlamingo's evaluation does it (one forward per candidate, batch 1), with
transformers' IDEFICS on the same model directory and the same JSON-lines input `flamingo score` reads. Prints one
JSON object: seconds, candidates, candidates_per_s, top1 (lines whose best candidate is index 0), threads, versions,
and every candidate's summed log-probability (to compare with flamingo's).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import IdeficsForVisionText2Text, IdeficsProcessor

IMAGE = "<image>"


def interleaved(prompt, images):
    """The processor's interleaved list for a prompt with <image> markers."""
    parts = prompt.split(IMAGE)
    out = [parts[0]] if parts[0] else []
    for img, text in zip(images, parts[1:]):
        out.append(img)
        if text:
            out.append(text)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    processor = IdeficsProcessor.from_pretrained(a.model)
    model = IdeficsForVisionText2Text.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    lines = [json.loads(l) for l in Path(a.input).read_text().splitlines() if l.strip()]
    base = Path(a.input).parent
    scores, top1, n = [], 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for line in lines:
            images = [Image.open(base / i).convert("RGB") for i in line["images"]]
            prefix = processor(text=[interleaved(line["prompt"], images)], return_tensors="pt")
            plen = prefix["input_ids"].shape[1]
            row = []
            for cand in line["candidates"]:
                enc = processor(text=[interleaved(line["prompt"] + cand, images)], return_tensors="pt")
                logits = model(**enc).logits[0].double()
                ids = enc["input_ids"][0]
                lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
                row.append(float(lp[plen - 1:].sum()))
                n += 1
            scores.append(row)
            top1 += int(max(range(len(row)), key=lambda k: (row[k], -k)) == 0)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "candidates": n, "candidates_per_s": n / seconds, "top1": top1,
                      "lines": len(lines), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "scores": scores}))


if __name__ == "__main__":
    main()
