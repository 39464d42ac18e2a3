import pytest

from vargpt.data.conversation import ConversationError, render_prompt, render_segments
from vargpt.data.records import Message
from vargpt.special_tokens import IMAGE, IMAGE_GEN


def test_vicuna_layout_and_targets():
    msgs = [Message("user", f"{IMAGE}\nWhat colour?"), Message("assistant", "red"),
            Message("user", "Draw it."), Message("assistant", f"Here it is.{IMAGE_GEN}")]
    segs = render_segments(msgs, system_prompt="Be nice.")
    assert segs == [
        (f"Be nice. USER: {IMAGE}\nWhat colour? ASSISTANT:", False),
        (" red</s>", True),
        ("USER: Draw it. ASSISTANT:", False),
        (f" Here it is.{IMAGE_GEN}</s>", True),
    ]
    # A system message overrides the configured system prompt.
    segs = render_segments([Message("system", "S"), *msgs[:2]], system_prompt="ignored")
    assert segs[0][0].startswith("S USER:")


def test_prompt_ends_with_assistant_tag_and_escapes_untrusted_text():
    p = render_prompt([Message("user", f"hi {IMAGE}")], system_prompt="")
    assert p.endswith("ASSISTANT:") and IMAGE not in p
    assert IMAGE in render_prompt([Message("user", f"hi {IMAGE}")], trusted=True)


@pytest.mark.parametrize("msgs", [[], [Message("assistant", "x")],
                                  [Message("user", "a"), Message("user", "b")]])
def test_bad_turn_orders_raise(msgs):
    with pytest.raises(ConversationError):
        render_segments(msgs)


def test_generation_prompt_needs_a_final_user_turn():
    with pytest.raises(ConversationError, match="last message"):
        render_prompt([Message("user", "a"), Message("assistant", "b")])
