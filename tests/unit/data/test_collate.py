import pytest

from vargpt.data.collate import IGNORE_INDEX, SequenceTooLongError, encode_record, pad_samples
from vargpt.data.records import Message, Record
from vargpt.special_tokens import IMAGE, IMAGE_GEN, SpecialTokenIds


def _rec(*turns, images=()):
    return Record(tuple(Message(r, c) for r, c in turns), tuple(images), source="t:1")


def test_slots_expand_and_only_assistant_text_is_target(hf_tokenizer, tmp_path):
    ids = SpecialTokenIds.from_tokenizer(hf_tokenizer)
    rec = _rec(("user", f"{IMAGE}\nwhat colour"), ("assistant", "red"), ("user", "draw it"),
               ("assistant", f"here{IMAGE_GEN} done"), images=(tmp_path / "a.png", tmp_path / "b.png"))
    s = encode_record(rec, hf_tokenizer, ids, image_tokens=4, gen_tokens=5, system_prompt="sys")
    assert len(s.input_ids) == len(s.labels)
    assert s.input_ids.count(ids.image) == 4 and s.input_ids.count(ids.image_gen_pad) == 5
    assert s.input_images == [tmp_path / "a.png"] and s.gen_images == [tmp_path / "b.png"]
    # The targets decode to exactly the assistant text (+ </s>), the start token is a target, slots are not.
    targets = [t for t in s.labels if t != IGNORE_INDEX]
    assert ids.image_gen_start in targets and ids.image_gen_pad not in targets and ids.image not in targets
    text = hf_tokenizer.decode([t for t in targets if t != ids.image_gen_start])
    assert text.replace(" ", "") == "red</s>here done</s>".replace(" ", "")
    start = s.input_ids.index(ids.image_gen_start)
    assert s.input_ids[start + 6] == ids.image_gen_end
    assert all(lab == IGNORE_INDEX for lab in s.labels[start + 1:start + 7])


def test_padding_and_length_limit(hf_tokenizer):
    ids = SpecialTokenIds.from_tokenizer(hf_tokenizer)
    a = encode_record(_rec(("user", "hi"), ("assistant", "red")), hf_tokenizer, ids, image_tokens=1, gen_tokens=1)
    b = encode_record(_rec(("user", "what colour is the square"), ("assistant", "red circle")), hf_tokenizer, ids,
                      image_tokens=1, gen_tokens=1)
    right = pad_samples([a, b], ids.pad)
    left = pad_samples([a, b], ids.pad, left=True)
    n = len(a.input_ids)
    assert right.attention_mask[0].tolist() == [1] * n + [0] * (right.input_ids.shape[1] - n)
    assert left.attention_mask[0].tolist()[-n:] == [1] * n and left.input_ids[0, -n:].tolist() == a.input_ids
    assert (right.labels[0, n:] == IGNORE_INDEX).all()
    with pytest.raises(SequenceTooLongError, match="exceed the context of 3"):
        encode_record(_rec(("user", "hi there"), ("assistant", "red")), hf_tokenizer, ids, image_tokens=1,
                      gen_tokens=1, max_length=3)


def test_memo_tokenizes_each_piece_once_with_the_same_ids(hf_tokenizer):
    ids = SpecialTokenIds.from_tokenizer(hf_tokenizer)
    recs = [_rec(("user", "what colour is the square?"), ("assistant", a)) for a in ("red", "blue", "red")]
    calls = []

    class Counting:
        def encode(self, text, add_special_tokens=False):
            calls.append(text)
            return hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    memo: dict[str, list[int]] = {}
    with_memo = [encode_record(r, Counting(), ids, image_tokens=1, gen_tokens=1, system_prompt="sys", memo=memo)
                 for r in recs]
    n_memo, calls[:] = len(calls), []
    plain = [encode_record(r, Counting(), ids, image_tokens=1, gen_tokens=1, system_prompt="sys") for r in recs]
    assert with_memo == plain
    assert n_memo == len(set(calls)) < len(calls)  # each distinct piece once, instead of once per record
