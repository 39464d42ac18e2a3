"""Class-conditional visual decoder benchmark: train (or load) the tiny decoder, sample, print one JSON.

    python benchmarks/decoder.py --data DIR --tokenizer DIR --out DIR --threads 2
    python benchmarks/decoder.py --data DIR --tokenizer DIR --decoder DIR/checkpoint   # skip training

Reported:

* ``oracle_accuracy``: ShapesWorld oracle colour+shape accuracy of ``--samples-per-class`` samples of
  every colour+shape pair of the training classes at the preset's default sampling settings
  (``VARGPTConfig.sampling``); ``oracle_min_class_accuracy`` is the worst pair, ``classes_below_90`` lists
  pairs under 0.9;
  ``oracle_accuracy_tokenizer_reconstructions`` (the same oracle on the tokenizer's reconstructions of
  held-out images of those classes) is the ceiling the tokenizer sets.
* ``oracle_layout_*_accuracy`` (ShapesWorld's default data, whose generation records' classes name the
  layout): classes ``"{size} {colour} {shape} {position}"``, ``--samples-per-class`` samples per
  colour+shape pair cycling through its layouts, each judged on colour, shape, size and position;
  ``oracle_plain_*_accuracy`` the same for ``"{colour} {shape}"`` classes (``--plain-classes`` data).
* ``oracle_unseen_*_accuracy`` / ``unseen_pairs`` (word-composed class conditions only): the same oracle on
  the colour x shape pairs the training data never drew (ShapesWorld's held-out combinations), their
  classes composed of known words (``VisualDecoder.with_composed_classes``), ``--samples-per-class`` per
  pair: how far the decoder's conditions compose beyond the pairs it was trained on.
* ``train_seconds`` (the optimisation loop) and ``tokenize_seconds`` (one pass of the frozen VQ-VAE).
* ``speedup_kv_cache``: wall time of a cache-less loop (every scale re-runs the whole prefix with the
  block-causal bias, same weights and sampler) over the KV-cached loop, batch ``--kv-batch``, codes
  only (VQ decoding is identical work in both); ``kv_same_codes_fraction`` checks they sample alike.
  ``kv_compute_bound`` is the token-count ratio sum(prefix_k) / L, the speed-up a compute-bound run
  can reach (the cached loop still processes every token once).
* ``speedup_kv_cache_k10`` / ``kv_compute_bound_k10``: the same comparison for a decoder of the same width,
  depth and heads (random weights: timing only) over the released model's ten scales
  (``patch_nums`` 1..16, L = 680 tokens: token-count bound 2.52x instead of the tiny preset's 1.89x).
* ``speedup_batch16``: images/s of one batch-16 call over 16 sequential batch-1 calls (codes + VQ
  decoding).
* ``prefix_forcing`` (with ``--prefix-forcing``): oracle accuracy when the first k scales are the
  tokenizer's codes of held-out images of each class and the rest is sampled, for k = 0 .. S (k = S is the
  tokenizer's reconstruction): shows at which scale the decoder loses the class.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vargpt.config import SamplingConfig, VARGPTConfig
from vargpt.data.records import image_to_tensor, load_image, load_records
from vargpt.data.shapesworld.generate import load_world
from vargpt.data.shapesworld.oracle import judge
from vargpt.generation.next_scale import class_condition, generate_class_images, next_scale_steps, to_pil
from vargpt.generation.sampling import cfg_mix, cfg_scale, sample
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.decoder_trainer import class_pairs, load_decoder, train_decoder


@torch.no_grad()
def no_cache_codes(decoder, vqvae, labels_B, sampling: SamplingConfig, generator) -> list[torch.Tensor]:  # noqa: ANN001
    """Reference loop without a KV cache: each scale re-runs all tokens so far with the block-causal bias."""
    q, B = vqvae.quantize, labels_B.shape[0]
    cond = class_condition(decoder, labels_B)
    S = len(decoder.patch_nums)
    f_hat = cond.new_zeros(B, decoder.vq.z_channels, decoder.patch_nums[-1], decoder.patch_nums[-1])
    tokens = [decoder.embed_start(cond)]
    idx_list = []
    for si, pn in enumerate(decoder.patch_nums):
        x = torch.cat(tokens, dim=1)
        logits = decoder.forward_blocks(x, cond, attn_bias=decoder.causal_bias(x.shape[1]))
        begin, end = decoder.offsets[si]
        logits = cfg_mix(logits[:B, begin:end], logits[B:, begin:end], cfg_scale(si, S, sampling.cfg,
                                                                                   sampling.cfg_schedule))
        idx = sample(logits, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature,
                     generator=generator)
        idx_list.append(idx)
        f_hat, nxt = q.next_scale_input(si, f_hat, q.embed(idx, pn))
        if nxt is not None:
            tokens.append(decoder.embed_scale(si + 1, nxt).repeat(2, 1, 1))
    return idx_list


def _timed(*fns, repeats: int) -> list[float]:  # noqa: ANN002
    """Best-of-``repeats`` wall time of each function, runs interleaved (robust to a shared machine)."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def oracle_eval(decoder, vqvae, classes, world, sampling, per_class: int, seed: int, grid: Path | None) -> dict:  # noqa: ANN001
    """Sample the decoder's classes and judge the samples with the ShapesWorld oracle on what each names.

    ``"{colour} {shape}"`` classes get ``per_class`` samples each; classes that also name a size and
    position (ShapesWorld's layout classes) get ``per_class`` samples per colour+shape pair, cycling
    through that pair's layouts. ``oracle_accuracy`` is colour+shape over all samples, per pair first
    (so each pair counts once); ``oracle_plain_*`` / ``oracle_layout_*`` split it by kind of class.
    """
    attrs = [world.class_attributes(c) for c in classes]
    plain = [i for i, a in enumerate(attrs) if set(a) == {"colour", "shape"}]
    by_pair: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(attrs):
        if set(a) > {"colour", "shape"}:
            by_pair.setdefault((a["colour"], a["shape"]), []).append(i)
    layout = [ids[k % len(ids)] for _, ids in sorted(by_pair.items()) for k in range(per_class)]
    labels = torch.tensor([i for i in plain for _ in range(per_class)] + layout, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([generate_class_images(decoder, vqvae, labels[i:i + 128], sampling=sampling,
                                              generator=gen).images_B3HW for i in range(0, len(labels), 128)])
    pil = to_pil(images)
    verdicts = [judge(img, attrs[label], world) for label, img in zip(labels.tolist(), pil, strict=True)]
    per_pair: dict[str, list[bool]] = {}
    for label, v in zip(labels.tolist(), verdicts, strict=True):
        per_pair.setdefault(f"{attrs[label]['colour']} {attrs[label]['shape']}", []).append(v["colour+shape"])
    pair_acc = {k: sum(v) / len(v) for k, v in per_pair.items()}
    n_plain = len(plain) * per_class

    def rates(vs: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
        return {k: round(sum(v[k] for v in vs) / len(vs), 4) for k in keys}

    overall = rates(verdicts, ("colour", "shape"))
    report: dict = {
        "oracle_accuracy": round(sum(pair_acc.values()) / len(pair_acc), 4),
        "oracle_colour_accuracy": overall["colour"],
        "oracle_shape_accuracy": overall["shape"],
        "oracle_min_class_accuracy": round(min(pair_acc.values()), 4),
        "classes_below_90": sorted(k for k, a in pair_acc.items() if a < 0.9),
        "samples_per_class": per_class, "num_classes": len(classes), "colour_shape_pairs": len(pair_acc),
    }
    if plain:
        report |= {f"oracle_plain_{k.replace('+', '_')}_accuracy": v
                   for k, v in rates(verdicts[:n_plain], ("colour+shape", "colour", "shape")).items()}
    if layout:
        keys = ("colour+shape", "colour", "shape", "size", "position")
        report |= {f"oracle_layout_{k.replace('+', '_')}_accuracy": v
                   for k, v in rates(verdicts[n_plain:], keys).items()}
        report["layout_classes"] = sum(len(v) for v in by_pair.values())
    if grid is not None:
        from PIL import Image

        side = pil[0].size[0]
        rows = (len(pil) + per_class - 1) // per_class
        canvas = Image.new("RGB", (side * per_class, side * rows))
        for i, im in enumerate(pil):
            canvas.paste(im, ((i % per_class) * side, (i // per_class) * side))
        canvas.save(grid)
    return report


@torch.no_grad()
def unseen_eval(decoder, vqvae, classes, world, sampling, per_class: int, seed: int) -> dict:  # noqa: ANN001
    """Oracle accuracy on the colour x shape pairs the training data never drew (``world.held_out``).

    Only for word-composed class conditions (``class_embed="words"``): each held-out pair gets
    ``per_class`` classes composed of known words (``VisualDecoder.with_composed_classes``), cycling
    through the layouts (size, position) of the training classes when those name one, judged on every
    attribute its class names. Returns ``{}`` for a class-table or unconditional decoder, or a world without
    held-out pairs.
    """
    if decoder.cfg.class_embed != "words" or not classes or not world.held_out:
        return {}
    attrs = [world.class_attributes(c) for c in classes]
    layouts = sorted({(a["size"], a["position"]) for a in attrs if {"size", "position"} <= set(a)})
    names, pairs = [], []
    for colour, shape in world.held_out:
        for k in range(per_class):
            if layouts:  # a stride coprime with most layout counts spreads the samples over sizes and places
                size, position = layouts[(k * 7) % len(layouts)]
                names.append(f"{size} {colour} {shape} {position}")
            else:
                names.append(f"{colour} {shape}")
            pairs.append(f"{colour} {shape}")
    composed, labels = decoder.with_composed_classes(names)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([generate_class_images(composed, vqvae, labels[i:i + 128], sampling=sampling,
                                              generator=gen).images_B3HW for i in range(0, len(labels), 128)])
    verdicts = [judge(img, world.class_attributes(name), world)
                for name, img in zip(names, to_pil(images), strict=True)]
    per_pair: dict[str, list[bool]] = {}
    for pair, v in zip(pairs, verdicts, strict=True):
        per_pair.setdefault(pair, []).append(v["colour+shape"])
    keys = ("colour+shape", "colour", "shape") + (("size", "position") if layouts else ())
    return {
        **{f"oracle_unseen_{k.replace('+', '_')}_accuracy": round(sum(v[k] for v in verdicts) / len(verdicts), 4)
           for k in keys},
        "unseen_pairs": {p: round(sum(v) / len(v), 4) for p, v in sorted(per_pair.items())},
    }


@torch.no_grad()
def tokenizer_ceiling(vqvae, data_dir: str, classes: list[str], world, limit: int = 512) -> float:  # noqa: ANN001
    """Oracle colour+shape accuracy of the tokenizer's reconstructions of held-out class images.

    The decoder can only draw what the tokenizer can represent, so this bounds ``oracle_accuracy``.
    """
    pairs, x = heldout_class_images(vqvae, data_dir, classes, limit)
    if not pairs:
        return float("nan")
    recon = torch.cat([vqvae.reconstruct(x[i:i + 128]) for i in range(0, len(pairs), 128)])
    hits = oracle_hits(to_pil((recon + 1) / 2), [cls for _, cls in pairs], world)
    return round(hits["colour+shape"] / len(pairs), 4)


def heldout_class_images(vqvae, data_dir: str, classes: list[str], limit: int) -> tuple[list, torch.Tensor | None]:  # noqa: ANN001
    """At most ``limit`` (image, class) pairs of the test split (train if none) whose class is in
    ``classes``, and the images as a tensor in [-1, 1] (None when there is no pair)."""
    split = "test" if (Path(data_dir) / "test.jsonl").is_file() else "train"
    pairs = [p for p in class_pairs(load_records(data_dir, split)) if p[1] in classes][:limit]
    if not pairs:
        return pairs, None
    return pairs, torch.stack([image_to_tensor(load_image(path, vqvae.cfg.image_size)) for path, _ in pairs])


def oracle_hits(images, class_names: list[str], world) -> dict[str, int]:  # noqa: ANN001
    """How many of ``images`` the oracle judges right in colour, shape and both, against their
    ``"{colour} {shape}"`` class names."""
    hits = {"colour": 0, "shape": 0, "colour+shape": 0}
    for img, cls in zip(images, class_names, strict=True):
        named = world.class_attributes(cls)
        verdict = judge(img, {"colour": named["colour"], "shape": named["shape"]}, world)
        for key in hits:
            hits[key] += int(verdict[key])
    return hits


@torch.no_grad()
def prefix_forcing(decoder, vqvae, data_dir: str, classes: list[str], world, sampling, limit: int = 256) -> dict:  # noqa: ANN001
    """Oracle colour / shape / colour+shape with the first k scales forced to held-out images' codes."""
    pairs, x = heldout_class_images(vqvae, data_dir, classes, limit)
    labels = torch.tensor([classes.index(c) for _, c in pairs])
    gt = vqvae.encode(x)
    S, out = len(decoder.patch_nums), {}
    for k in range(S + 1):
        forced = [gt[si] if si < k else None for si in range(S)]
        f_hat = None
        for event in next_scale_steps(decoder, vqvae.quantize, class_condition(decoder, labels), sampling=sampling,
                                      generator=torch.Generator().manual_seed(0), forced_idx=forced):
            f_hat = event.f_hat_BZhw
        hits = oracle_hits(to_pil((vqvae.decode(f_hat).clamp(-1, 1) + 1) / 2), [cls for _, cls in pairs], world)
        out[f"first_{k}_scales_given"] = {key: round(v / len(pairs), 4) for key, v in hits.items()}
    return out


def kv_timing(decoder, vqvae, sampling, kv_batch: int, repeats: int) -> dict:  # noqa: ANN001
    """KV-cached vs cache-less code generation of ``kv_batch`` class-conditional samples (codes only: VQ
    decoding is the same work in both and would dilute the ratio)."""
    labels = torch.arange(kv_batch) % decoder.num_classes

    def cached():
        return [e.idx_Bl for e in next_scale_steps(decoder, vqvae.quantize, class_condition(decoder, labels),
                                                    sampling=sampling, generator=torch.Generator().manual_seed(0))]

    def uncached():
        return no_cache_codes(decoder, vqvae, labels, sampling, torch.Generator().manual_seed(0))

    t_cached, t_uncached = _timed(cached, uncached, repeats=repeats)
    lens = [end for _, end in decoder.offsets]
    same = sum(int(torch.equal(x, y)) for x, y in zip(cached(), uncached(), strict=True)) / len(lens)
    return {
        "speedup_kv_cache": round(t_uncached / t_cached, 3),
        "kv_cached_images_per_s": round(kv_batch / t_cached, 2),
        "no_cache_images_per_s": round(kv_batch / t_uncached, 2),
        "kv_compute_bound": round(sum(lens) / lens[-1], 3),
        "kv_same_codes_fraction": same,
    }


def speed(decoder, vqvae, sampling, kv_batch: int, repeats: int) -> dict:  # noqa: ANN001
    """KV-cache and batching speed-ups of code generation (images decoded too in the batching test)."""
    kv = kv_timing(decoder, vqvae, sampling, kv_batch, repeats)
    l16 = torch.arange(16) % decoder.num_classes
    t_b16, t_seq = _timed(
        lambda: generate_class_images(decoder, vqvae, l16, sampling=sampling,
                                      generator=torch.Generator().manual_seed(0)),
        lambda: [generate_class_images(decoder, vqvae, l16[i:i + 1], sampling=sampling,
                                       generator=torch.Generator().manual_seed(i)) for i in range(16)],
        repeats=repeats)
    return {
        **kv,
        "kv_batch": kv_batch,
        "speedup_batch16": round(t_seq / t_b16, 3),
        "batch16_images_per_s": round(16 / t_b16, 2),
        "sequential_images_per_s": round(16 / t_seq, 2),
    }


# The released tokenizer's scales (SPEC 1.1).
RELEASE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def kv_speed_k10(decoder, sampling, kv_batch: int, repeats: int) -> dict:  # noqa: ANN001
    """:func:`kv_timing` for ``decoder``'s sizes over :data:`RELEASE_PATCH_NUMS` (random weights), keys ``*_k10``."""
    import dataclasses

    from vargpt.visual_decoder.decoder import VisualDecoder

    vq = dataclasses.replace(decoder.vq, patch_nums=RELEASE_PATCH_NUMS,
                             image_size=RELEASE_PATCH_NUMS[-1] * decoder.vq.downsample)
    torch.manual_seed(0)
    big = VisualDecoder(decoder.cfg, vq).eval()
    timing = kv_timing(big, MultiScaleVQVAE(vq).eval(), sampling, kv_batch, repeats)
    return {f"{k}_k10": v for k, v in timing.items()}


def main() -> None:
    """Parse arguments, run, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ShapesWorld dataset folder")
    p.add_argument("--tokenizer", required=True, help="trained tokenizer checkpoint")
    p.add_argument("--decoder", default=None, help="trained decoder (skip training)")
    p.add_argument("--out", default=None, help="training output folder (default: a temp dir)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--cfg", type=float, default=None, help="override the preset's CFG strength")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--kv-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timing runs (best of)")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the oracle samples")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--prefix-forcing", action="store_true", help="also report prefix_forcing (see docstring)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    report: dict = {"threads": args.threads, "preset": args.preset}
    decoder_dir = args.decoder
    if decoder_dir is None:
        out = args.out or tempfile.mkdtemp(prefix="decoder-bench-")
        report |= train_decoder(data_dir=args.data, tokenizer_dir=args.tokenizer, out_dir=out, preset=args.preset,
                                max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=False)
        decoder_dir = out
    decoder, classes = load_decoder(decoder_dir)
    vqvae = MultiScaleVQVAE.from_pretrained(args.tokenizer)
    base = VARGPTConfig.from_name(args.preset).sampling
    overrides = {k: v for k, v in (("cfg", args.cfg), ("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    sampling = SamplingConfig(**{**{f: getattr(base, f) for f in ("cfg", "cfg_schedule", "top_k", "top_p",
                                                                   "temperature", "more_smooth")}, **overrides})
    report["sampling"] = {"cfg": sampling.cfg, "cfg_schedule": sampling.cfg_schedule, "top_k": sampling.top_k,
                          "top_p": sampling.top_p, "temperature": sampling.temperature}
    t0 = time.perf_counter()
    report |= oracle_eval(decoder, vqvae, classes, load_world(args.data), sampling, args.samples_per_class,
                          args.seed, args.grid)
    report["oracle_eval_seconds"] = round(time.perf_counter() - t0, 2)
    report |= unseen_eval(decoder, vqvae, classes, load_world(args.data), sampling, args.samples_per_class, args.seed)
    report["oracle_accuracy_tokenizer_reconstructions"] = tokenizer_ceiling(vqvae, args.data, classes,
                                                                             load_world(args.data))
    if args.prefix_forcing:
        report["prefix_forcing"] = prefix_forcing(decoder, vqvae.eval(), args.data, classes, load_world(args.data),
                                                  sampling)
    if not args.skip_speed:
        report |= speed(decoder, vqvae, sampling, args.kv_batch, args.repeats)
        report |= kv_speed_k10(decoder, sampling, args.kv_batch, args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
