"""The ablation's variants as data: chains, shared prefixes, and which parameters each stage run trains."""

import dataclasses

import pytest

from vargpt.ablation import STAGE3, VARIANTS, StageRun, Variant, ablation_command, chain_key, markdown_table, plan
from vargpt.config import ConfigError, VARGPTConfig
from vargpt.training.stages import vargpt_stages


def _chains():
    return {v.name: tuple(s.tag for s in v.stages) for v in VARIANTS}


def test_variant_chains_follow_table_4():
    assert _chains() == {
        "full": ("stage1", "stage2", "stage3"),
        "no_stage1": ("stage2", "stage3"),
        "no_stage3": ("stage1", "stage2"),
        "frozen_gen_projectors": ("stage1", "stage2", "stage3_decoder_only"),
        "frozen_decoder": ("stage1", "stage2", "stage3_projectors_only"),
    }
    for v in VARIANTS:
        # only the last stage of a variant is modified
        assert all(s.trainable is None and not s.without for s in v.stages[:-1])


def test_shared_prefixes_train_once_parents_first():
    keys = [chain_key(c) for c in plan(VARIANTS)]
    assert keys == ["stage1", "stage1+stage2", "stage1+stage2+stage3", "stage2", "stage2+stage3",
                    "stage1+stage2+stage3_decoder_only", "stage1+stage2+stage3_projectors_only"]
    assert sum(len(v.stages) for v in VARIANTS) == 13  # without sharing
    for i, k in enumerate(keys):
        parent = k.rsplit("+", 1)[0] if "+" in k else None
        assert parent is None or parent in keys[:i]
    # w/o stage 3 is full's stage-2 model; both frozen variants start from it too.
    models = {v.name: chain_key(v.stages) for v in VARIANTS}
    assert models["no_stage3"] == "stage1+stage2"


@pytest.mark.parametrize("preset", ["tiny", "vargpt-v1-7b"])
def test_frozen_stage3_variants_split_stage3_trainable_set(hf_tokenizer, preset):
    from vargpt.model import VARGPT
    from vargpt.special_tokens import SpecialTokenIds
    from vargpt.training.loop import set_trainable

    cfg = VARGPTConfig.from_name("tiny")  # the 7b preset's globs name the same parameters
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=1))
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer))
    by_tag = {s.tag: s for v in VARIANTS for s in v.stages}
    stage3 = set(set_trainable(model, vargpt_stages(preset)["stage3"].train.trainable))
    assert STAGE3.resolve_trainable(preset) is None  # full: the stage's own
    decoder_only = set(set_trainable(model, by_tag["stage3_decoder_only"].resolve_trainable(preset)))
    projectors_only = set(set_trainable(model, by_tag["stage3_projectors_only"].resolve_trainable(preset)))
    assert decoder_only and all(n.startswith("vargpt_gen.") for n in decoder_only)
    assert projectors_only and all(n.startswith("image_gen_projector") for n in projectors_only)
    assert decoder_only | projectors_only == stage3 and not decoder_only & projectors_only
    assert by_tag["stage3_decoder_only"].stage == by_tag["stage3_projectors_only"].stage == STAGE3.stage


def test_tiny_stage3_leaves_the_llm_without_a_backward_pass(hf_tokenizer):
    """Nothing upstream of the frozen LLM trains in tiny's stage 3 (decoder embeddings, input projector)."""
    from vargpt.model import VARGPT
    from vargpt.special_tokens import SpecialTokenIds
    from vargpt.training.loop import set_trainable

    cfg = VARGPTConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=1))
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer))
    names = set(set_trainable(model, vargpt_stages("tiny")["stage3"].train.trainable))
    assert any(n.startswith("vargpt_gen.blocks.") for n in names)
    assert any(n.startswith("image_gen_projector_out.") for n in names)
    upstream = ("image_gen_projector.", "vargpt_gen.word_embed", "vargpt_gen.pos_", "vargpt_gen.lvl_embed",
                "vargpt_gen.class_", "language_model.")
    assert not [n for n in names if n.startswith(upstream)]


def test_a_stage_run_that_leaves_nothing_is_refused():
    with pytest.raises(ConfigError, match="leaves nothing"):
        StageRun("none", "stage3", without=("*",)).resolve_trainable("tiny")
    with pytest.raises(ConfigError, match="not both"):
        StageRun("both", "stage3", trainable=("a.*",), without=("b.*",))


def test_plan_rejects_bad_variants():
    with pytest.raises(ConfigError, match="no stages"):
        plan([Variant("empty", "empty", ())])
    with pytest.raises(ConfigError, match="two different"):
        plan([Variant("a", "a", (StageRun("x", "stage1"),)), Variant("b", "b", (StageRun("x", "stage2"),))])


def test_table_and_command():
    table = markdown_table([{"label": "full", "understanding_accuracy": 0.4, "generation_accuracy": None,
                             "fid": 179.94, "train_seconds": 12.345}])
    assert table.splitlines()[0] == ("| variant | understanding | generation colour+shape | generation colour | FID "
                                     "| train seconds |")
    assert table.splitlines()[2] == "| full | 0.400 | n/a | n/a | 179.9 | 12.3 |"
    assert ablation_command(out_dir="a b", max_steps=3) == "vargpt ablate --preset tiny --out 'a b' --max-steps 3"


def test_recipe_prefix_names_are_recipe_steps(tmp_path):
    from vargpt.ablation import PREFIX_STEPS, UNTIL_ASSEMBLE
    from vargpt.recipe import STEPS, run_recipe

    names = [s.name for s in STEPS]
    assert UNTIL_ASSEMBLE == tuple(names[:names.index("assemble") + 1]) and set(PREFIX_STEPS) <= set(names)
    with pytest.raises(ValueError, match="unknown recipe steps"):
        run_recipe(out_dir=tmp_path / "run", only=["assemble", "nope"])
    assert not (tmp_path / "run").exists()
