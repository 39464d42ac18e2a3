"""Tiny LLaVA understanding benchmark: train all base steps on ShapesWorld, answer held-out questions.

Prints ONE JSON object: ``accuracy`` (exact match, normalised) on the held-out colour and shape
questions, ``per_qtype``, ``per_combo`` (seen / held-out colour x shape combinations), every qtype's
accuracy, ``per_objects`` (every qtype on one-object and on two-object scenes: binding),
``train_seconds`` (total wall time of all base steps), each step's metrics, and decode speed of
our KV-cached greedy loop vs ``LlavaForConditionalGeneration.generate`` on the same weights.

    OMP_NUM_THREADS=2 python benchmarks/understanding.py --out runs/bench_understanding
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch


def _hf_llava(model, vt_cfg):  # noqa: ANN001, ANN202
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from vargpt.understanding.llava import to_hf_llava_state

    text = dict(model.llm.hf_config_dict())
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig.from_dict(model.vision_tower.hf_config_dict()),
        text_config=AutoConfig.for_model(text.pop("model_type"), **text),
        image_token_id=model.image_token_id, vision_feature_layer=vt_cfg.feature_layer,
        vision_feature_select_strategy="default" if vt_cfg.drop_cls else "full", projector_hidden_act="gelu",
        image_seq_length=model.num_image_tokens,
    )
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.load_state_dict(to_hf_llava_state(model.state_dict()))
    return hf


def decode_speed(model, tokenizer, processor, vt_cfg, items, *, batch: int = 32, new_tokens: int = 16,  # noqa: ANN001
                 repeats: int = 3) -> dict:
    """Tokens/s of our greedy loop vs HF ``generate`` (greedy, same prompts, same weights)."""
    from vargpt.data.records import load_image
    from vargpt.understanding.answer import build_prompt_ids, greedy_generate, left_pad

    items = items[:batch]
    prompts = [build_prompt_ids(tokenizer, q, image_token_id=model.image_token_id,
                                num_image_tokens=model.num_image_tokens) for _, q, _ in items]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    pixels = processor([load_image(r.input_images[0]) for r, _, _ in items])
    eos = tokenizer.eos_token_id
    if model.vision_tower.is_resnet:  # HF LLaVA holds ViT towers only: a random ViT stands in on both sides
        from vargpt.understanding.llava import Llava, vit_stand_in

        tower, vt_cfg = vit_stand_in(vt_cfg)
        model = Llava(tower, model.projector, model.llm, image_token_id=model.image_token_id).eval()
    hf = _hf_llava(model, vt_cfg)

    def ours(eos_id: int = eos) -> list[list[int]]:
        return greedy_generate(model, ids, mask, pixels_N3HW=pixels, eos_id=eos_id, max_new_tokens=new_tokens)

    def theirs(force_length: bool) -> list[list[int]]:
        extra = {"min_new_tokens": new_tokens} if force_length else {}
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **extra)
        rows = out[:, ids.shape[1]:].tolist()
        return [row[:row.index(eos)] if eos in row else row for row in rows]

    with torch.no_grad():
        same = ours() == theirs(force_length=False)
        # best of `repeats`, alternating; ours without early stop: exactly batch x new_tokens tokens, like
        # the forced-length HF run
        t_ours = t_hf = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours(eos_id=-1)
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs(force_length=True)
            t_hf = min(t_hf, time.perf_counter() - t0)
    n = len(items) * new_tokens
    return {"batch": len(items), "new_tokens": new_tokens, "ours_tokens_per_s": round(n / t_ours, 1),
            "hf_generate_tokens_per_s": round(n / t_hf, 1), "ratio": round(t_hf / t_ours, 3),
            "greedy_tokens_match_hf": bool(same)}


def main() -> None:
    """Generate ShapesWorld (if needed), train the base models, evaluate, print one JSON object."""
    from vargpt.config import IMAGE_ATTENTION_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_understanding")
    p.add_argument("--data", default=None, help="existing dataset folder (default: generate into OUT/data)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-size", type=int, default=None,
                   help="override the preset tower's patch size (a CLIP tower only; the tiny ResNet's is 8)")
    p.add_argument("--image-attention", choices=IMAGE_ATTENTION_MODES, default=None,
                   help="LLMConfig.image_attention for the LLaVA steps (default: the preset's)")
    p.add_argument("--replay-fraction", type=float, default=None,
                   help="TrainConfig.replay_fraction of instruction tuning (default: the recipe's)")
    p.add_argument("--vision-replay-fraction", type=float, default=None,
                   help="TrainConfig.replay_fraction of the vision tower's pretraining (default: the recipe's, 0)")
    p.add_argument("--eval-only", action="store_true", help="evaluate OUT/llava without training")
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed comparison")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vargpt.data.records import load_records
    from vargpt.data.shapesworld.generate import write_dataset
    from vargpt.evaluation.understanding import evaluate_vqa, qa_items
    from vargpt.training.base_models import load_llava, train_base_models
    from vargpt.training.base_vision import VISION_TRAIN

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "train.jsonl").is_file():
        write_dataset(data, n_train=args.n_train, n_test=args.n_test, seed=args.seed, progress=False)
    result: dict = {}
    if not args.eval_only:
        tower = {"tower_overrides": {"patch_size": args.patch_size}} if args.patch_size else {}
        if args.vision_replay_fraction is not None:
            tower["replay_fraction"] = args.vision_replay_fraction
        align = {"image_attention": args.image_attention} if args.image_attention else {}
        instruct = {"replay_fraction": args.replay_fraction} if args.replay_fraction is not None else {}
        steps = train_base_models(data, out, resume=False, progress=False,
                                  step_overrides={"vision": tower, "align": align, "instruct": instruct})
        result["train_seconds"] = steps.pop("train_seconds")
        result["steps"] = {k: {m: v for m, v in s.items() if m != "checkpoint"} for k, s in steps.items()}
    model, tokenizer, processor, vt_cfg = load_llava(out / "llava")
    test = load_records(data, "test")
    t0 = time.perf_counter()
    main_eval = evaluate_vqa(model, tokenizer, processor, test, qtypes=("colour", "shape"), num_examples=6)
    all_eval = evaluate_vqa(model, tokenizer, processor, test, num_examples=0)
    result.update({
        "accuracy": round(main_eval["accuracy"], 4), "n": main_eval["n"], "per_qtype": main_eval["per_qtype"],
        "per_combo": _per_combo(model, tokenizer, processor, test),
        "per_objects": _per_objects(model, tokenizer, processor, test),
        "all_qtypes": {"accuracy": round(all_eval["accuracy"], 4), "per_qtype": all_eval["per_qtype"]},
        "eval_seconds": round(time.perf_counter() - t0, 2), "examples": main_eval["examples"],
        "image_tokens": model.num_image_tokens, "image_attention": model.image_attention,
        "instruct_replay_fraction": result.get("steps", {}).get("instruct", {}).get("replay_fraction"),
        "vision_replay_fraction": (args.vision_replay_fraction if args.vision_replay_fraction is not None
                                   else VISION_TRAIN.replay_fraction),
        "threads": torch.get_num_threads(),
    })
    if not args.no_speed:
        result["decode_speed"] = decode_speed(model, tokenizer, processor, vt_cfg, qa_items(test))
    print(json.dumps(result))


def _per_combo(model, tokenizer, processor, records) -> dict:  # noqa: ANN001
    from vargpt.evaluation.understanding import evaluate_vqa

    groups = defaultdict(list)
    for r in records:
        groups["seen" if r.meta.get("combo_seen", True) else "held_out"].append(r)
    return {k: round(evaluate_vqa(model, tokenizer, processor, v, qtypes=("colour", "shape"),
                                  num_examples=0)["accuracy"], 4) for k, v in sorted(groups.items())}


def _per_objects(model, tokenizer, processor, records) -> dict:  # noqa: ANN001
    """Accuracy per qtype on one-object and on two-object scenes (ShapesWorld ``meta.objects``): a question
    about one of two objects needs the answer read from *that* object's cells (binding)."""
    from vargpt.evaluation.understanding import evaluate_vqa

    groups = defaultdict(list)
    for r in records:
        groups[f"{len(r.meta.get('objects', []))}_objects"].append(r)
    out = {}
    for k, v in sorted(groups.items()):
        res = evaluate_vqa(model, tokenizer, processor, v, num_examples=0)
        out[k] = {"accuracy": round(res["accuracy"], 4), "per_qtype": res["per_qtype"], "n": res["n"]}
    return out


if __name__ == "__main__":
    main()
