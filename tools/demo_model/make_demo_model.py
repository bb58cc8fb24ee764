#!/usr/bin/env python3
"""Trains the bundled demo model: a tiny IDEFICS (transformers' own `IdeficsForVisionText2Text`) that describes
pictures of coloured shapes, and writes the held-out expected results the engine is tested against.

Outputs (paths relative to the repository root, overridable):
  assets/demo-model/            config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                                preprocessor_config.json, generation_config.json, training_log.json
  tests/fixtures/demo-heldout/  NNN.png and expected.json: held-out pictures (another seed), the correct answer from
                                the generator, and transformers' greedy `generate` ids and text on the saved model
  assets/examples/              a few example pictures (another seed again)

Everything follows from the seeds (--seed: training data and initialisation; --val-seed, --heldout-seed,
--examples-seed); training runs on the CPU, one thread by default, with deterministic algorithms. Two stages: the
vision encoder alone on a per-patch probe, then everything on the answers (see README.md). Run from the repository
root:

    tools/demo_model/.venv/bin/python tools/demo_model/make_demo_model.py

Needs torch, transformers 5.x (still ships IDEFICS v1), tokenizers, pillow, numpy, safetensors; see README.md.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor, PreTrainedTokenizerFast
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

SPECIALS = ["<unk>", "<s>", "</s>"]
FAKE, IMAGE, EOU = "<fake_token_around_image>", "<image>", "<end_of_utterance>"
# The decoupled (additional) vocabulary, in the real IDEFICS instruct tokenizer's order.
ADDITIONAL = [FAKE, IMAGE, EOU]


def prompt_text(question):
    """The user prompt as the engine's CLI takes it (`<image>` marks the picture)."""
    return f"User:<image>{question}{EOU}\nAssistant:"


def processor_prompt(question, image):
    """The same prompt as IdeficsProcessor's interleaved list."""
    return ["User:", image, f"{question}{EOU}\nAssistant:"]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: LLaMA-shaped BPE (prepend + replace spaces with U+2581, no pre-tokenizer), the full printable ASCII
# alphabet (any prompt encodes), every word of the task a single token. Trained with Metaspace + punctuation
# pre-tokenizers so that no merge crosses a word or punctuation boundary, then saved in the LLaMA layout.


def make_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation("isolated")])
    alphabet = [chr(c) for c in range(32, 127)] + ["\u2581", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(shapes.corpus() * 2, trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    llama = Tokenizer.from_str(json.dumps(spec))
    vocab_size = llama.get_vocab_size()
    for text in shapes.corpus():
        a, b = tok.encode(text).tokens, llama.encode(text).tokens
        assert a == b, (text, a, b)
    for word in shapes.SHAPES + shapes.COLOUR_NAMES + shapes.NUMBERS[1:] + ["a", "an", "and"]:
        assert llama.encode(word).tokens == ["\u2581" + word], (word, llama.encode(word).tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=llama,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=ADDITIONAL,
    )
    for i, t in enumerate(ADDITIONAL):
        assert fast.convert_tokens_to_ids(t) == vocab_size + i, t
    return fast, vocab_size


# ---------------------------------------------------------------------------------------------------------------


def make_config(vocab_size, a):
    return IdeficsConfig(
        vocab_size=vocab_size,
        additional_vocab_size=len(ADDITIONAL),
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        cross_layer_interval=a.cross_interval,
        qk_layer_norms=True,
        alpha_type="float",
        alpha_initializer="ones",  # tanh(1): the gated cross-attention starts open
        alphas_initializer_range=0.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        use_resampler=True,
        perceiver_config=dict(use_resampler=True, resampler_n_latents=a.latents, resampler_depth=2,
                              resampler_n_heads=4, resampler_head_dim=a.vision_dim // 4,
                              qk_layer_norms_perceiver=True),
        vision_config=dict(embed_dim=a.vision_dim, image_size=a.image_size, patch_size=a.patch_size,
                           num_hidden_layers=a.vision_layers, num_attention_heads=4,
                           intermediate_size=a.vision_dim * 2, num_channels=3, hidden_act="gelu",
                           layer_norm_eps=1e-5),
        freeze_text_layers=False,
        freeze_vision_layers=False,
        freeze_lm_head=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "fc2", "output_proj", "c_proj")


def init_weights_(model, gen):
    """transformers' IDEFICS keeps only a 0.02-std init ("not meant for training from scratch"); at these widths that
    leaves attention flat and the vision position embeddings drowned. Use fan-in scaling instead: 1/sqrt(fan_in) for
    every projection into a block, half that for the projections back into the residual stream, unit-variance
    embeddings (token, class, position)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = mod.weight[0].numel()
                std = (0.5 if leaf in OUTPUT_PROJECTIONS else 1.0) / math.sqrt(fan_in)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
        emb = model.model.vision_model.embeddings
        emb.class_embedding.copy_(torch.randn(emb.class_embedding.shape, generator=gen))


class Batcher:
    """Turns examples into model inputs exactly as IdeficsProcessor would (checked against it once per prompt)."""

    def __init__(self, processor, tokenizer, patch_size=8):
        self.patch_size = patch_size
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_proc = processor.image_processor
        self.eou = tokenizer.convert_tokens_to_ids(EOU)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self._prompts = {}

    def prompt_ids(self, question, image):
        if question not in self._prompts:
            enc = self.processor(text=[processor_prompt(question, image)], return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            mask = enc["image_attention_mask"][0, :, 0].tolist()
            assert mask == [1 if i >= ids.index(self.image_id) else 0 for i in range(len(ids))]
            self._prompts[question] = ids
        return self._prompts[question]

    def answer_ids(self, answer):
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eou]

    def __call__(self, examples):
        """examples: [(image, question, answer, ...)] -> dict of tensors and the answer start of each row."""
        rows, starts = [], []
        for image, question, answer, *_ in examples:
            p = self.prompt_ids(question, image)
            rows.append(p + self.answer_ids(answer))
            starts.append(len(p))
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        attn = torch.zeros(len(rows), T, dtype=torch.long)
        targets = torch.full((len(rows), T), -100, dtype=torch.long)
        img_mask = torch.zeros(len(rows), T, 1, dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, starts)):
            ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            targets[i, s: len(r)] = torch.tensor(r[s:])
            img_mask[i, r.index(self.image_id): len(r), 0] = 1
        pixels = self.pixels(examples).unsqueeze(1)  # [B, 1 image, 3, S, S]
        inputs = dict(input_ids=ids, attention_mask=attn, image_attention_mask=img_mask, pixel_values=pixels)
        return inputs, targets, self.aux_targets(examples, pixels.shape[-1])

    def pixels(self, examples):
        return self.image_proc([ex[0] for ex in examples], return_tensors="pt")

    def aux_targets(self, examples, image_size):
        """Training-only targets for the auxiliary heads (see AuxHeads)."""
        patch, slots = [], []
        for ex in examples:
            layout = ex[4]
            cover = shapes.patch_coverage(layout, image_size, self.patch_size)  # [P, n]
            nc, ns = len(shapes.COLOUR_NAMES), len(shapes.SHAPES)
            t = np.zeros((cover.shape[0], nc + ns + 3), dtype=np.float32)
            for i, (shape, colour, *_) in enumerate(layout):
                hit = cover[:, i] > 0.15
                t[hit, shapes.COLOUR_NAMES.index(colour)] = 1
                t[hit, nc + shapes.SHAPES.index(shape)] = 1
                t[hit, nc + ns + i] = 1  # which shape, counting from the left
            patch.append(t)
            # Left to right: colour (or none) and shape (or none) of each of 3 slots.
            row = []
            for k in range(3):
                if k < len(layout):
                    row += [shapes.COLOUR_NAMES.index(layout[k][1]), shapes.SHAPES.index(layout[k][0])]
                else:
                    row += [len(shapes.COLOUR_NAMES), len(shapes.SHAPES)]
            slots.append(row)
        return torch.tensor(np.stack(patch)), torch.tensor(slots)


class AuxHeads(torch.nn.Module):
    """Training-only linear probes that give the vision side a dense signal from the first step: per vision patch,
    which colours and shapes it shows; from the resampler's latents, the colour and shape of each shape left to
    right; per patch also which shape it belongs to counting from the left. They read the model's own activations (forward hooks) and are dropped after training: the saved model is
    a plain IdeficsForVisionText2Text."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        d = cfg.vision_config.embed_dim
        self.nc, self.ns = len(shapes.COLOUR_NAMES), len(shapes.SHAPES)
        self.patch = torch.nn.Linear(d, self.nc + self.ns + 3)
        self.slots = torch.nn.Linear(cfg.perceiver_config.resampler_n_latents * d, 3 * (self.nc + 1 + self.ns + 1))
        self.captured = {}
        model.model.vision_model.register_forward_hook(
            lambda m, i, o: self.captured.__setitem__("vision", o.last_hidden_state))
        model.model.perceiver_resampler.register_forward_hook(lambda m, i, o: self.captured.__setitem__("latents", o))

    def loss(self, patch_t, slot_t):
        v = self.captured["vision"][:, 1:]  # patches, without the class token
        patch_loss = F.binary_cross_entropy_with_logits(self.patch(v), patch_t)
        lat = self.captured["latents"].flatten(1)
        out = self.slots(lat).view(lat.shape[0], 3, -1)
        slot_loss = 0
        for k in range(3):
            slot_loss = slot_loss + F.cross_entropy(out[:, k, : self.nc + 1], slot_t[:, 2 * k])
            slot_loss = slot_loss + F.cross_entropy(out[:, k, self.nc + 1:], slot_t[:, 2 * k + 1])
        return patch_loss, slot_loss / 6


def masked_logits(logits, banned):
    logits = logits.clone()
    logits[..., banned] = float("-inf")
    return logits


def loss_and_exact(model, inputs, targets, banned):
    out = model(**inputs, use_cache=False)
    logits = out.logits[:, :-1]
    tgt = targets[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)
    with torch.no_grad():
        pred = masked_logits(logits, banned).argmax(-1)
        ok = ((pred == tgt) | (tgt == -100)).all(-1)  # every answer token right => greedy decoding gives the answer
    return loss, ok


def evaluate(model, batches, banned):
    """Teacher-forced exact match: the share of examples whose every answer token is the argmax (so greedy decoding
    reproduces the answer exactly), overall and per question kind."""
    model.eval()
    per_kind = {}
    with torch.no_grad():
        for inputs, targets, kinds in batches:
            _, ok = loss_and_exact(model, inputs, targets, banned)
            for kind, hit in zip(kinds, ok.tolist()):
                per_kind.setdefault(kind, []).append(hit)
    model.train()
    everything = [h for v in per_kind.values() for h in v]
    return sum(everything) / len(everything), {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())}


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def pretrain_vision(a, model, aux, batcher, rng, val, log):
    """Stage 1: the vision encoder alone, on the per-patch probe (colour, shape, which shape from the left). Shape
    recognition is what a from-scratch ViT learns slowest; with this dense signal, and without the language model's
    gradients competing for it, it takes a few hundred steps."""
    vit = model.model.vision_model
    params = list(vit.parameters()) + list(aux.patch.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    val_pixels = batcher.pixels(val)
    val_t, _ = batcher.aux_targets(val, a.image_size)
    nc, ns = len(shapes.COLOUR_NAMES), len(shapes.SHAPES)
    one_shape = val_t[..., nc: nc + ns].sum(-1) == 1
    t0 = time.time()
    for step in range(a.vision_steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        examples = [shapes.sample(rng) for _ in range(a.batch)]
        patch_t, _ = batcher.aux_targets(examples, a.image_size)
        out = aux.patch(vit(pixel_values=batcher.pixels(examples)).last_hidden_state[:, 1:])
        loss = F.binary_cross_entropy_with_logits(out, patch_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.vision_steps:
            with torch.no_grad():
                o = aux.patch(vit(pixel_values=val_pixels).last_hidden_state[:, 1:])
                right = o[..., nc: nc + ns].argmax(-1) == val_t[..., nc: nc + ns].argmax(-1)
                acc = right[one_shape].float().mean().item()
            entry = dict(vision_step=step + 1, patch_loss=round(loss.item(), 4), val_patch_shape=round(acc, 4),
                         seconds=round(time.time() - t0, 1))
            log.append(entry)
            print(json.dumps(entry), flush=True)


def train(a, model, batcher, banned, log):
    rng = np.random.default_rng(a.seed)
    val_rng = np.random.default_rng(a.val_seed)
    val = [shapes.sample(val_rng) for _ in range(a.val_size)]
    val_batches = [batcher(val[i: i + 128])[:2] + ([ex[3] for ex in val[i: i + 128]],)
                   for i in range(0, len(val), 128)]
    aux = AuxHeads(model)
    t_start = time.time()
    pretrain_vision(a, model, aux, batcher, rng, val, log)

    decay, no_decay = [], []
    for n, p in list(model.named_parameters()) + list(aux.named_parameters()):
        (decay if p.dim() >= 2 and "embed" not in n and "latents" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    t0 = time.time()
    ema = None
    print("stage 2: everything", flush=True)
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        inputs, targets, (patch_t, slot_t) = batcher([shapes.sample(rng) for _ in range(a.batch)])
        loss, _ = loss_and_exact(model, inputs, targets, banned)
        patch_loss, slot_loss = aux.loss(patch_t, slot_t)
        opt.zero_grad(set_to_none=True)
        (loss + a.aux_weight * (patch_loss + slot_loss)).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        aux_ema = (patch_loss.item(), slot_loss.item())
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            acc, kinds = evaluate(model, val_batches, banned)
            entry = dict(step=step + 1, loss=round(ema, 4), val_exact=round(acc, 4), by_kind=kinds,
                         seconds=round(time.time() - t0, 1))
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if acc >= a.target and step + 1 >= a.min_steps:
                break
        elif (step + 1) % 25 == 0:
            print(f"step {step + 1} loss {ema:.4f} aux {aux_ema[0]:.3f} {aux_ema[1]:.3f} {time.time() - t0:.0f}s",
                  flush=True)
    return time.time() - t_start


def save_model(a, model, tokenizer, image_proc, vocab_size, log, train_seconds):
    out = a.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_proc.save_pretrained(out)
    eou = tokenizer.convert_tokens_to_ids(EOU)
    gen = GenerationConfig(
        bos_token_id=1, eos_token_id=[2, eou], pad_token_id=0,
        bad_words_ids=[[tokenizer.convert_tokens_to_ids(FAKE)], [tokenizer.convert_tokens_to_ids(IMAGE)]],
        do_sample=False, max_new_tokens=32,
    )
    gen.save_pretrained(out)
    with open(os.path.join(out, "training_log.json"), "w") as f:
        args = {k: (os.path.relpath(v, ROOT) if k in ("out", "heldout_out", "examples_out") else v) for k, v in vars(a).items()}
        json.dump(dict(args=args, vocab_size=vocab_size, train_seconds=round(train_seconds, 1),
                       torch=torch.__version__, transformers=__import__("transformers").__version__, log=log),
                  f, indent=1)
        f.write("\n")


def reference_generate(model, processor, tokenizer, image, question, max_new_tokens):
    """transformers' greedy generate on the saved model; returns (ids, text, min top-1/top-2 logit margin)."""
    enc = processor(text=[processor_prompt(question, image)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    margin = min(float((lambda t: t[0] - t[1])(torch.topk(s[0], 2).values)) for s in out.scores)
    return enc["input_ids"][0].tolist(), new, tokenizer.decode(new, skip_special_tokens=True), margin


def write_heldout(a, model, processor, tokenizer):
    out = a.heldout_out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    rng = np.random.default_rng(a.heldout_seed)
    items, right = [], 0
    for i in range(a.heldout):
        image, question, answer, kind, layout = shapes.sample(rng)
        fname = f"{i:03d}.png"
        image.save(os.path.join(out, fname), optimize=True)
        image = Image.open(os.path.join(out, fname))  # exactly what the engine will read
        prompt_ids, ids, text, margin = reference_generate(model, processor, tokenizer, image, question, a.max_new_tokens)
        right += text == answer
        items.append(dict(image=fname, kind=kind, question=question, prompt=prompt_text(question), answer=answer,
                          prompt_ids=prompt_ids, generated_ids=ids, generated_text=text,
                          min_greedy_margin=round(margin, 4)))
        print(f"{fname} {question!r} -> {text!r} ({'ok' if text == answer else 'WRONG, want ' + repr(answer)}) "
              f"margin {margin:.3f}", flush=True)
    meta = dict(
        generator="transformers %s IdeficsForVisionText2Text.generate, greedy, float32, eager attention, "
                  "eos_token_id [</s>, <end_of_utterance>], bad_words_ids [<fake_token_around_image>], [<image>]"
                  % __import__("transformers").__version__,
        model="assets/demo-model",
        heldout_seed=a.heldout_seed,
        max_new_tokens=a.max_new_tokens,
        transformers_exact=right / len(items),
        items=items,
    )
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"held-out: transformers exact {right}/{len(items)} = {right / len(items):.3f}", flush=True)
    return right / len(items)


def write_examples(a, model, processor, tokenizer):
    out = a.examples_out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(a.examples_seed)
    found = []
    n_shapes_wanted = [3, 2, 1, 3]
    while len(found) < len(n_shapes_wanted):
        layout = shapes.sample_layout(rng)
        if len(layout) != n_shapes_wanted[len(found)]:
            continue
        image = shapes.render(layout, rng, 128)
        answer = shapes.caption([(s, c) for s, c, *_ in layout])
        _, _, text, margin = reference_generate(model, processor, tokenizer, image, shapes.DESCRIBE, 32)
        name = "shapes.png" if not found else f"shapes-{len(found) + 1}.png"
        image.save(os.path.join(out, name), optimize=True)
        found.append(dict(image=name, answer=answer, transformers=text, margin=round(margin, 3)))
        print(name, repr(text), "want", repr(answer), flush=True)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--val-seed", type=int, default=1001)
    ap.add_argument("--heldout-seed", type=int, default=2002)
    ap.add_argument("--examples-seed", type=int, default=3003)
    ap.add_argument("--out", default=os.path.join(ROOT, "assets/demo-model"))
    ap.add_argument("--heldout-out", default=os.path.join(ROOT, "tests/fixtures/demo-heldout"))
    ap.add_argument("--examples-out", default=os.path.join(ROOT, "assets/examples"))
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--vision-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--min-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-size", type=int, default=384)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cross-interval", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--patch-size", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a busy 2-core machine, and the results depend on it)")
    ap.add_argument("--skip-train", action="store_true", help="reuse the model in --out; only write the held-out set")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)

    tokenizer, vocab_size = make_tokenizer()
    image_proc = IdeficsImageProcessorPil(image_size=a.image_size)
    processor = IdeficsProcessor(image_processor=image_proc, tokenizer=tokenizer)
    banned = [tokenizer.convert_tokens_to_ids(FAKE), tokenizer.convert_tokens_to_ids(IMAGE)]

    if not a.skip_train:
        model = IdeficsForVisionText2Text(make_config(vocab_size, a))
        init_weights_(model, torch.Generator().manual_seed(a.seed))
        n = sum(p.numel() for p in model.parameters())
        print(f"vocab {vocab_size}+{len(ADDITIONAL)}, {n:,} parameters", flush=True)
        log = []
        secs = train(a, model, Batcher(processor, tokenizer, a.patch_size), banned, log)
        print(f"trained in {secs:.0f}s", flush=True)
        save_model(a, model.eval(), tokenizer, image_proc, vocab_size, log, secs)

    # The reference is what transformers computes from the saved directory.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(a.out)
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil.from_pretrained(a.out), tokenizer=tokenizer)
    model = IdeficsForVisionText2Text.from_pretrained(a.out, dtype=torch.float32, attn_implementation="eager").eval()
    write_heldout(a, model, processor, tokenizer)
    write_examples(a, model, processor, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
