"""Prompt building and label masking: the supervised ids are exactly the answer plus its
end-of-turn token, the prompt is exactly what inference feeds, no BOS is assumed."""

import pytest

from readers import to_messages
from prompts import (IGNORE_INDEX, PromptFormat, caption_messages, encode_conversation, encode_prompt,
                     ensure_image_token, with_image_placeholder)
from utils.skips import SampleError

N = 5  # image slots, small so the assertions stay readable


def qwen_format(tok):
    return PromptFormat.build(tok, "<|image_pad|>", N, chat_template_kwargs={"enable_thinking": False})


@pytest.fixture(scope="module")
def qwen_tok(toy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.llm)


def supervised(ids, labels):
    return [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]


def test_qwen_style_no_bos_supervises_answer_and_im_end(qwen_tok):
    tok = qwen_tok
    assert tok.bos_token is None
    fmt = qwen_format(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.end_of_turn_id == im_end and fmt.stop_ids[0] == im_end
    answer = "左边有一个红色的圆形。"
    ids, labels = encode_conversation(tok, fmt, caption_messages(answer, "描述这张图片"), 128)
    assert supervised(ids, labels) == tok.encode(answer, add_special_tokens=False) + [im_end]
    # The target is the tail of the sequence; nothing after the end-of-turn token.
    n_target = len(supervised(ids, labels))
    assert all(l == IGNORE_INDEX for l in labels[:-n_target])
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")   # no BOS invented in front
    assert ids.count(fmt.image_token_id) == N


def test_bos_tokenizer_gets_exactly_one_bos_and_supervises_answer_and_eos(bos_tokenizer):
    tok = bos_tokenizer
    image_id = ensure_image_token(tok, "<|image_pad|>")
    fmt = PromptFormat.build(tok, "<|image_pad|>", N)
    assert fmt.end_of_turn_id == tok.eos_token_id
    answer = "a red circle on the left"
    ids, labels = encode_conversation(tok, fmt, caption_messages(answer, "describe the image"), 128)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert supervised(ids, labels) == tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    assert ids.count(image_id) == N


def test_training_prompt_equals_inference_prompt(qwen_tok):
    tok = qwen_tok
    fmt = qwen_format(tok)
    ids, labels = encode_conversation(tok, fmt, caption_messages("右边有一个蓝色的三角形。", "描述这张图片"), 128)
    # eval_llava.py: the user types the question, the image placeholder is added for them.
    chat = with_image_placeholder([{"role": "user", "content": "描述这张图片"}])
    prompt, _ = encode_prompt(tok, fmt, chat)
    assert ids[:len(prompt)] == prompt
    assert all(l == IGNORE_INDEX for l in labels[:len(prompt)])
    # ...and the prompt is the chat template's own rendering with add_generation_prompt and
    # thinking off (the empty think block included), image slots in place of <image>.
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<think>\n\n</think>\n\n")
    slot = "<|image_pad|>"
    assert tok.decode(prompt) == text.replace("<image>", slot * N)


def test_multi_turn_supervises_every_answer_and_its_end_token(qwen_tok):
    tok = qwen_tok
    fmt = qwen_format(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    msgs = to_messages([{"from": "human", "value": "<image>\n什么颜色？"}, {"from": "gpt", "value": "红色"},
                        {"from": "human", "value": "什么形状？"}, {"from": "gpt", "value": "圆形"}])
    ids, labels = encode_conversation(tok, fmt, msgs, 128)
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    assert supervised(ids, labels) == enc("红色") + [im_end] + enc("圆形") + [im_end]
    # The last turn's prompt is what eval_llava.py feeds after one exchange.
    prompt, _ = encode_prompt(tok, fmt, msgs[:-1])
    assert ids[:len(prompt)] == prompt


def test_truncation_cuts_the_answer_never_an_image_slot(qwen_tok):
    tok = qwen_tok
    fmt = qwen_format(tok)
    long_answer = "左边有一个红色的圆形。" * 30
    prompt, _ = encode_prompt(tok, fmt, caption_messages("", "描述这张图片")[:1])
    budget = len(prompt) - N + 10
    ids, labels = encode_conversation(tok, fmt, caption_messages(long_answer, "描述这张图片"), budget)
    assert ids.count(fmt.image_token_id) == N
    assert len(ids) - N == budget
    assert supervised(ids, labels) == tok.encode(long_answer, add_special_tokens=False)[:10]
    with pytest.raises(SampleError) as err:
        encode_conversation(tok, fmt, caption_messages("x", "描述这张图片"), len(prompt) - N - 1)
    assert err.value.reason == "prompt_too_long"


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "x"}], "no_image_placeholder"),
    ([{"role": "user", "content": "<image>\n<image>"}, {"role": "assistant", "content": "x"}], "too_many_images"),
    ([{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "   "}], "empty_answer"),
])
def test_unusable_conversations_raise_a_reason(qwen_tok, messages, reason):
    with pytest.raises(SampleError) as err:
        encode_conversation(qwen_tok, qwen_format(qwen_tok), messages, 128)
    assert err.value.reason == reason
