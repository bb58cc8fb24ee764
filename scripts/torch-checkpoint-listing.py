"""Lists every tensor of the PyTorch checkpoints under the given directories, as torch.load reads them (the
reference for tests/pytorch_checkpoint.rs, never our own reader): name, dtype, shape and the float64 sum of its
values ("inf", "-inf" or "nan" as text), per file, written to <dir>/torch_tensors.json.
    .venv-bench/bin/python scripts/torch-checkpoint-listing.py tests/fixtures/tiny-openflamingo-*
"""
import json, math, pathlib, sys

import torch

def finite_or_text(x):
    """JSON has no infinity (a GPT-NeoX `masked_bias` is -inf in fp16): those are written as "inf", "-inf", "nan"."""
    return x if math.isfinite(x) else str(x)


for d in map(pathlib.Path, sys.argv[1:]):
    listing = {}
    for f in sorted(p for p in d.rglob("*") if p.suffix in (".pt", ".bin")):
        sd = torch.load(f, map_location="cpu", weights_only=True)
        listing[str(f.relative_to(d))] = {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "sum": finite_or_text(v.double().sum().item())}
            for k, v in sd.items() if isinstance(v, torch.Tensor)
        }
    (d / "torch_tensors.json").write_text(json.dumps(listing, indent=1, sort_keys=True) + "\n")
    print(d, {k: len(v) for k, v in listing.items()})
