"""The toy world teaches what the benchmarks measure (issue 32): the prior's image slots hold what a
projector can make, the benchmark scaffolding fits the demos' text budget, and the toy MMBench
cannot be answered by a model that only learnt to say what it sees in Chinese."""

import torch

from bench import read_bench
from dataset import ImageLoader, ImageTransform, LlavaDataset
from prompts import CHAT_TEMPLATE_KWARGS, IMAGE_TOKEN, PromptFormat
from readers import read_chat_json, read_cogvlm_sft
from toy_instructions import ensure_instruction_data
from toy_world import COMBOS, ENGLISH, SIZES, blend_slots, caption_of
from train_config import STAGE2_DEMO, STAGE3_DEMO
from transformers import AutoTokenizer
from utils.bench_scoring import extract_choice


def toy_format(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.llm)
    n = (SIZES["demo"].tower_px // SIZES["demo"].patch) ** 2 + 1
    return tok, PromptFormat.build(tok, IMAGE_TOKEN, n, chat_template_kwargs=CHAT_TEMPLATE_KWARGS)


def test_every_turn_of_the_demos_data_fits_their_max_text_len(tiny):
    # VLMEvalKit's English scaffolding, spelt out in bytes, made 1.6% of the stage-2 demo's turns
    # too long for its --max_text_len (issue 32); as whole tokens, none is.
    tok, fmt = toy_format(tiny)
    data = ensure_instruction_data(tiny, "tiny", log=lambda *a: None)
    sft, _ = read_cogvlm_sft(data.sft_train)
    style, _ = read_chat_json(data.style_train)
    for records, root, max_text_len in ((sft, data.sft_train, STAGE2_DEMO["max_text_len"]),
                                        (style, data.style_images, STAGE3_DEMO["max_text_len"])):
        ds = LlavaDataset(records, tok, fmt, ImageTransform(size=32), ImageLoader(root),
                          max_text_len=max_text_len)
        skips = [ds[i].get("skip") for i in range(len(ds))]
        assert len(skips) > len(records) // 2 and not any(skips), [s for s in skips if s][:3]
    # The scaffolding is one token each; so are the English option values.
    for text in ("Options:", "A.", "Please select the correct answer from the options above.",
                 "Please answer yes or no.", "Yes", *ENGLISH.values()):
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
    assert "cross" not in tok.tokenize("across the right")[:-1] and "red" not in tok.tokenize("covered")  # whole words


def test_the_toy_mmbench_is_english_and_a_chinese_answer_picks_no_option(tiny):
    # VLMEvalKit reads a reply that contains exactly one option's text as that option: with
    # Chinese options, a stage-1 model's caption or one-word answer in Chinese "chose" the right
    # one (circular 52 before stage 2). Its English options are what stage 2 teaches.
    data = ensure_instruction_data(tiny, "tiny", log=lambda *a: None)
    rows = read_bench(f"{data.bench}/toy_MMBench_EN.tsv").items
    assert rows
    english = set(ENGLISH.values())
    chinese = {v: k for k, v in ENGLISH.items()}
    for row in rows:
        options = row.options
        assert set(options.values()) <= english and row.question.isascii()
        right = options[row.answer]
        assert extract_choice(right, options) == row.answer
        combo = next(c for c in COMBOS if chinese[right] in c)
        others = [v for v in combo if v != chinese[right]]
        for reply in (chinese[right], caption_of(*combo), "，".join(others + [chinese[right]])):
            assert extract_choice(reply, options) != row.answer, reply


def test_the_priors_image_slots_hold_blends_of_the_three_words():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(20, 8)
    image, words = 3, torch.tensor([[5, 6, 7]])
    ids = torch.tensor([[1, image, image, image, image, 2]])
    x = blend_slots(embed, ids, words, image, torch.Generator().manual_seed(0))
    assert torch.equal(x[0, [0, 5]], embed(ids)[0, [0, 5]])           # text is left as it is
    e = embed(words)[0]                                                 # [3, D]
    for t in range(1, 5):                                               # each slot: sum of w_k e_k + noise
        w = torch.linalg.lstsq(e.T, x[0, t].unsqueeze(-1)).solution.squeeze(-1)
        assert ((w > 0.2) & (w < 1.1)).all(), w
    assert not torch.allclose(x[0, 1], x[0, 2])                         # weights differ from slot to slot
    x.sum().backward()
    assert embed.weight.grad[5:8].abs().sum() > 0                       # the words' embeddings learn through it
