"""Talk to a trained model of any stage: interactive chat, one-shot answers, batch evaluation;
or the same against a reference model behind an OpenAI-compatible API (--api_base).

Everything comes from the checkpoint (towers, projector, prompt format); --vision_tower/--llm
only override where the frozen models live now. --checkpoint takes a run folder
(checkpoints/<run>: the step its `latest` names), a step folder (checkpoints/<run>/step_000600)
or that folder's projector.safetensors.

    # interactive: type an image path or URL, then questions; `clear`, `exit`
    python eval_llava.py --checkpoint checkpoints/<run>
    # one shot: stdout carries the reply alone (logs go to stderr)
    python eval_llava.py --checkpoint checkpoints/<run> --image data/toy/eval/images/000000.png --prompt 描述这张图片
    # batch VQA on a val chat.json from convert_vqa.py: predictions (official format) + accuracy
    python eval_llava.py --checkpoint checkpoints/<run> --vqa data/toy/vqa_chat/chat_val.json
    # score predictions alone with the official VQA v2 metric
    python eval_llava.py --vqa_eval --questions Q.json --annotations A.json --predictions P.json
    # captions for a chat.json, an SA1B folder or an image folder (+ BLEU-4/CIDEr-D where references exist)
    python eval_llava.py --checkpoint checkpoints/<run> --captions data/toy/eval/chat.json
    # a benchmark in VLMEvalKit's TSV layout (MMBench, CCBench, MMStar, SEED, AI2D, MME, POPE, ...),
    # scored by its exact-matching rules; predictions resume from <out_dir>/<name>_predictions.jsonl
    python eval_llava.py --checkpoint checkpoints/<run> --bench data/bench/MMBench_DEV_CN.tsv
    # the same questions to a reference model (key in $OPENAI_API_KEY, never printed or saved)
    python eval_llava.py --api_base https://api.openai.com/v1 --api_model gpt-4o-mini --vqa data/toy/vqa_chat/chat_val.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import sys
import urllib.parse

from assistant import Assistant, add_api_args, answer_all, load_assistant
from bench import PROMPT_STYLES, Bench, BenchError, BenchStopped, read_bench, run_bench
from checkpoint_io import checkpoint_file, read_checkpoint_meta
from dataset import IMAGE_EXTENSIONS, decode_image, original_size
from prompts import CAPTION_PROMPT, IMAGE_PLACEHOLDER
from readers import read_chat_json, read_sa1b
from utils import console
from utils.atomic import atomic_write
from utils.caption_metrics import score_captions
from utils.config import Parser
from utils.openai_api import ApiError, ChatApi
from utils.skips import SampleError
from utils.vqa_eval import evaluate, main as vqa_eval_main


def image_reference(line: str) -> str | None:
    """The image a chat line names (a path, expanded, or a URL), or None.

    A line names an image only when it is one word after shell-style unquoting (terminals
    quote drag-and-dropped paths, or escape their spaces) and that word is a URL, an existing
    file, a quoted path, or path-shaped with an image extension ("cat.jpg", "~/a.png"). A
    missing one is then reported as such, never sent to the model. Anything else is a question:
    Chinese questions have no spaces, so "它是红色/蓝色的吗？" is one word with a "/" in it."""
    text = line.strip()
    if text.startswith(("http://", "https://", "file://")) and not any(c.isspace() for c in text):
        return text
    if os.path.isfile(os.path.expanduser(text)):   # an existing file, spaces and all
        return os.path.expanduser(text)
    word, quoted = _one_word(text)
    if word is None:
        return None
    path = os.path.expanduser(word)
    shaped = not QUESTION_MARKS.search(word)
    if os.path.isfile(path) or (shaped and word.lower().endswith(IMAGE_EXTENSIONS)) or (quoted and _path_like(word)):
        return path
    return None


def maybe_path(line: str) -> str | None:
    """A line that may be a mistyped path or a question ("/tmp/photo", "./scan", "data/toy/evl/x"
    where data/toy exists): the chat asks which it is. None when image_reference decides, or when
    it is plainly a question ("红色/蓝色": no folder 红色 here)."""
    if image_reference(line) is not None:
        return None
    word, _ = _one_word(line.strip())
    if word is None or QUESTION_MARKS.search(word):
        return None
    path = os.path.expanduser(word)
    if word.startswith(("/", "~", "./", "../")) or ("/" in word and os.path.isdir(os.path.dirname(path.rstrip("/")))):
        return path
    return None


def folder_reference(line: str) -> str | None:
    """The existing folder a chat line names ("data/toy/bench", a folder dragged in), or None. A
    bare word names a folder only when quoted: "data" alone is more likely a question."""
    word, quoted = _one_word(line.strip())
    if word is None or not (quoted or _path_like(word) or word.startswith(".")):
        return None
    path = os.path.expanduser(word)
    return path if os.path.isdir(path) else None


def folder_note(folder: str) -> str:
    """"(12 images in it, e.g. data/x/000000.png)": what a folder given for an image holds."""
    try:
        images = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    except OSError as e:
        return f"({e.strerror.lower()})"
    if not images:
        return "(no images in it)"
    return f"({len(images)} image{'s' * (len(images) != 1)} in it, e.g. {os.path.join(folder, images[0])})"


# A question's punctuation: a word holding any of these is not a file name anyone typed.
QUESTION_MARKS = re.compile(r"[?？!！,，。、；;:：]")


def _one_word(text: str) -> tuple[str | None, bool]:
    """(the single word of a line after shell-style unquoting, whether it was quoted or
    escaped); (None, False) for several words or an unbalanced quote ("what's this?")."""
    try:
        words = shlex.split(text)
    except ValueError:
        return None, False
    if len(words) != 1 or not words[0]:
        return None, False
    return words[0], text[0] in "'\"" or "\\" in text


def _path_like(word: str) -> bool:
    return "/" in word or word.startswith("~") or word.lower().endswith(IMAGE_EXTENSIONS)


def _read(stdin, prompt: str) -> str | None:
    """One line typed after `prompt`; None at EOF or on Ctrl-C (a Ctrl-C right after the prompt
    is printed still leaves cleanly)."""
    try:
        print(prompt, end="", flush=True)
        line = stdin.readline()
    except KeyboardInterrupt:
        print()
        return None
    return line or None


def chat(assistant: Assistant, gen: dict, stdin=None) -> None:
    """The course's terminal loop: an image path/URL loads an image and resets the dialogue,
    text asks about it, `clear` empties the history, `exit`/`quit` leave. Ctrl-C during a reply
    stops it (the turn is dropped from the history); Ctrl-C at the prompt leaves."""
    console.info("Type an image path or http(s) URL to load it; then ask. 'clear' resets, 'exit' quits, "
                 "Ctrl-C stops a reply.")
    stdin = stdin or sys.stdin  # looked up at call time: a redirected or replaced stdin is honoured
    image, messages = None, []
    while True:
        line = _read(stdin, "\n你: ")
        if line is None:  # EOF or Ctrl-C
            break
        line = line.strip()
        if not line:
            continue
        if line.lower() in ("exit", "quit"):
            break
        if line.lower() == "clear":
            messages = []
            console.success("history cleared (the image stays)")
            continue
        if (folder := folder_reference(line)) is not None:   # never a question: say what it is, wait
            console.warn(f"{folder} is a folder, not an image {folder_note(folder)}: type an image's path")
            continue
        source = image_reference(line)
        if source is None and (guess := maybe_path(line)) is not None:
            # A path or a question? Ask rather than guess; a plain Enter keeps it a question.
            answer = _read(stdin, f"「{line}」 is not a file. Send it to the model as a question? [Y/n] ")
            if answer is None:
                break
            if answer.strip().lower() in ("n", "no", "否"):
                console.info(f"not sent; type an existing image path (nothing at {guess})")
                continue
        if source is not None:
            try:
                image = assistant.loader(source)
            except SampleError as e:
                console.error(f"file not found: {source}" if e.reason == "missing_image"
                              else f"could not load the image: {e}")
                continue
            messages = []
            width, height = original_size(image)   # the file's, not the draft-decoded size the model sees
            console.success(f"image loaded ({width}x{height}); dialogue reset")
            continue
        if image is None:
            console.warn("load an image first (a path or an http(s) URL)")
            continue
        messages.append({"role": "user", "content": line})
        print("助手: ", end="", flush=True)
        try:
            reply = assistant.reply(image, messages, stream=True, **gen)
        except KeyboardInterrupt:
            messages.pop()  # an unanswered question must not shape the next reply
            print()
            console.warn("reply stopped; the question was dropped from the history")
            continue
        except ApiError as e:  # the reference model's API failed: say why, keep chatting
            messages.pop()
            print()
            console.error(f"the API gave no answer ({e}); the question was dropped from the history")
            continue
        messages.append({"role": "assistant", "content": reply})


# --------------------------------------------------------------------------- batch modes

def run_vqa(assistant: Assistant, chat_json: str, image_root: str, out_dir: str, batch_size: int,
            max_new_tokens: int) -> dict:
    """Answer every question of a val chat.json (convert_vqa.py keeps question_id, answer_type and
    the ten answers in each record), write official-format predictions, score them."""
    records, bad = read_chat_json(chat_json)
    items = [(r.image, r.conversations[:1]) for r in records]
    replies, skipped = answer_all(assistant, items, image_root, batch_size, max_new_tokens, "vqa")
    predictions, references = [], []
    for i, (r, reply) in enumerate(zip(records, replies)):
        qid = r.meta.get("question_id", i)
        # Records without the ten answers (not from convert_vqa.py) are scored against their one answer.
        answers = r.meta.get("answers") or [r.conversations[1]["content"]] * 10
        references.append({"question_id": qid, "answer_type": r.meta.get("answer_type", "other"), "answers": answers})
        if reply is not None:  # a failed image is a missing prediction: it scores 0 and is counted
            predictions.append({"question_id": qid, "answer": reply})
    scores = {**evaluate(references, predictions), "skipped_records": dict(bad), "skipped_images": dict(skipped)}
    return _write_results(out_dir, output_name("vqa", chat_json), predictions, scores)


def caption_items(source: str, prompt: str) -> tuple[list[tuple[str, list[dict]]], list[str | None], str]:
    """A chat.json, an SA1B folder (parquet) or a folder of images (references from same-name
    .txt files, as scripts/save_examples.py writes them) -> items, references, image root."""
    if source.endswith(".json"):
        records, _ = read_chat_json(source)
        return ([(r.image, r.conversations[:1]) for r in records], [r.conversations[1]["content"] for r in records],
                os.path.dirname(os.path.abspath(source)))
    ask = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"}]
    if glob.glob(os.path.join(source, "*.parquet")) or glob.glob(os.path.join(source, "data", "*.parquet")):
        records, _ = read_sa1b(source)
        return [(r.image, ask) for r in records], [r.caption for r in records], source
    names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS))
    refs = []
    for n in names:
        txt = os.path.join(source, os.path.splitext(n)[0] + ".txt")
        refs.append(open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else None)
    return [(n, ask) for n in names], refs, source


def run_captions(assistant: Assistant, source: str, prompt: str, out_dir: str, batch_size: int,
                 max_new_tokens: int) -> dict:
    items, refs, root = caption_items(source, prompt)
    replies, skipped = answer_all(assistant, items, root, batch_size, max_new_tokens, "captions")
    predictions = [{"image": img, "caption": reply, "reference": ref}
                   for (img, _), reply, ref in zip(items, replies, refs) if reply is not None]
    scored = {str(i): p for i, p in enumerate(predictions) if p["reference"]}
    scores = score_captions({k: [p["reference"]] for k, p in scored.items()},
                            {k: p["caption"] for k, p in scored.items()}) if scored else {"n": 0}
    scores.update({"images": len(items), "captioned": len(predictions), "skipped_images": dict(skipped)})
    return _write_results(out_dir, output_name("captions", source), predictions, scores)


def output_name(kind: str, source: str) -> str:
    """Result files are named after their input, so evaluating another set never overwrites
    them: captions on data/toy/eval/chat.json -> captions_eval_chat_{predictions,scores}.json."""
    path = os.path.abspath(source).rstrip(os.sep)
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"{os.path.basename(os.path.dirname(path))}_{stem}" if os.path.isfile(path) else stem
    return f"{kind}_" + re.sub(r"[^\w.-]+", "_", name)


def _write_results(out_dir: str, name: str, predictions: list, scores: dict) -> dict:
    pred_path, score_path = os.path.join(out_dir, f"{name}_predictions.json"), os.path.join(out_dir, f"{name}_scores.json")
    atomic_write(pred_path, json.dumps(predictions, ensure_ascii=False, indent=1))
    atomic_write(score_path, json.dumps(scores, ensure_ascii=False, indent=2))
    console.info(f"predictions: {pred_path}\nscores:      {score_path}")
    return scores


# --------------------------------------------------------------------------- inputs, before any model loads

class InputError(ValueError):
    """An input refused before the model loads (a folder or a text file as --image): one line."""


def check_inputs(args: argparse.Namespace) -> tuple[Bench | None, ChatApi | None]:
    """Everything that can be checked without the model, checked before it loads (Qwen3-0.6B
    takes a while; a typo should cost nothing): the checkpoint, --image, the batch modes' files,
    the judge's settings. FileNotFoundError, InputError or BenchError, one line each. Returns the
    --bench benchmark, read (and checked whole: columns, answers, indexes) here once, and the judge."""
    if args.checkpoint:
        read_checkpoint_meta(args.checkpoint)       # missing, damaged, or a file that is not one of ours
    if args.api_base:
        try:                                        # its URL and key (nothing is sent yet)
            ChatApi(args.api_base, args.api_model, args.api_key_env, timeout=args.api_timeout)
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.image is not None:
        check_image(args.image)
    if args.vqa and not os.path.isfile(args.vqa):
        raise FileNotFoundError(f"--vqa {args.vqa}: no such file (a val chat.json from convert_vqa.py)")
    if args.vqa and args.image_root and not os.path.isdir(args.image_root):
        raise FileNotFoundError(f"--image_root {args.image_root}: no such folder")
    if args.captions and not os.path.exists(args.captions):
        raise FileNotFoundError(f"--captions {args.captions}: no such file or folder")
    if args.captions and os.path.isfile(args.captions) and not args.captions.endswith(".json"):
        raise InputError(f"--captions {args.captions}: give a chat.json, an SA1B folder or a folder of images")
    judge = None
    if args.bench and args.judge_api_base:
        try:
            judge = ChatApi(args.judge_api_base, args.judge_model, args.judge_key_env, timeout=args.api_timeout)
        except ValueError as e:   # not a URL, or no key; ChatApi's message names the assistant's flags
            raise InputError("the judge: " + str(e).replace("--api_key_env", "--judge_key_env")
                             .replace("--api_base", "--judge_api_base")) from None
    return (read_bench(args.bench) if args.bench else None), judge


def check_image(source: str) -> None:
    """--image: a file must decode as an image (a text file named .jpg does not); a URL must be
    well-formed, and is fetched once, for the reply."""
    if "://" in source and not source.startswith("file://"):
        url = urllib.parse.urlsplit(source)
        if url.scheme not in ("http", "https") or not url.hostname or any(c.isspace() for c in source):
            raise InputError(f"--image {source}: neither an http(s) URL nor a file path")
        return
    path = source.removeprefix("file://")
    if os.path.isdir(path):
        raise InputError(f"--image {path} is a folder, not an image {folder_note(path)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        decode_image(path)
    except SampleError as e:
        why = {"corrupt_image": "not an image, or a damaged one", "image_too_large": "too many pixels"}
        raise InputError(f"--image {path}: {why.get(e.reason, e.reason)} "
                         f"({e.detail.removeprefix(path + ': ')})") from None


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="a run folder (checkpoints/<run>: its latest checkpoint), "
                                                      "a step folder, or a projector.safetensors")
    p.add_argument("--vision_tower", default=None, help="override the tower path stored in the checkpoint")
    p.add_argument("--llm", default=None, help="override the LLM path stored in the checkpoint")
    p.add_argument("--image", default=None, help="one-shot mode: image path or URL")
    p.add_argument("--prompt", default=None, help="one-shot mode: the question")
    p.add_argument("--max_new_tokens", type=int, default=256, help="reply length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model folders to run their own code")
    b = p.add_argument_group("batch modes")
    b.add_argument("--vqa", default=None, help="val chat.json from convert_vqa.py: answer all, write and score predictions")
    b.add_argument("--vqa_eval", action="store_true", help="score --predictions against --annotations (no model)")
    b.add_argument("--questions", default=None, help="--vqa_eval: official VQA v2 questions JSON")
    b.add_argument("--annotations", default=None, help="--vqa_eval: official VQA v2 annotations JSON")
    b.add_argument("--predictions", default=None, help="--vqa_eval: [{question_id, answer}] JSON")
    b.add_argument("--captions", default=None, help="chat.json, SA1B folder or image folder to caption (and score)")
    b.add_argument("--caption_prompt", default=CAPTION_PROMPT, help="--captions: the instruction for folders")
    b.add_argument("--image_root", default=None, help="--vqa: image root (default: the chat.json's folder)")
    b.add_argument("--batch_size", type=int, default=32, help="batch modes: questions per generate call")
    b.add_argument("--answer_tokens", type=int, default=16, help="--vqa: answer length limit (VQA answers are short)")
    b.add_argument("--out_dir", default=None, help="batch modes: where predictions and scores go "
                                                  "(default: runs/eval/<checkpoint name>, or runs/eval/api_<model>)")
    k = p.add_argument_group("benchmarks (VLMEvalKit's TSV layout and scoring rules)")
    k.add_argument("--bench", default=None, help="a VLMEvalKit benchmark TSV (scripts/download_data.py bench NAME): "
                                                 "answer every row (resumable), score, print the table")
    k.add_argument("--bench_prompt", default="vlmeval", choices=PROMPT_STYLES,
                   help="vlmeval: VLMEvalKit's default prompt; llava: LLaVA-1.5's (\"Answer with the option's "
                        "letter from the given choices directly.\" / \"请直接回答选项字母。\")")
    k.add_argument("--extract", default="exact", choices=["exact", "lenient"],
                   help="exact: VLMEvalKit's exact matching only; lenient: also report a figure that accepts "
                        "\"选A\", \"c\", \"是的\" (never mixed into the comparable one)")
    k.add_argument("--bench_tokens", type=int, default=0, help="reply length limit (0: 16 for multiple choice, "
                                                              "32 for yes/no)")
    k.add_argument("--run_dir", default=None, help="also write the figures to this run folder's TensorBoard "
                                                  "(bench/<name>/...), at the checkpoint's step")
    k.add_argument("--judge_api_base", default=None, help="an OpenAI-compatible model that extracts the choice "
                                                         "where exact matching cannot (a separate figure)")
    k.add_argument("--judge_model", default=None, help="the judge's model name")
    k.add_argument("--judge_key_env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    add_api_args(p)
    args = p.parse_args(argv)
    if args.vqa_eval:
        if not (args.annotations and args.predictions):
            p.error("--vqa_eval needs --annotations and --predictions (and optionally --questions)")
        vqa_eval_main(["--annotations", args.annotations, "--predictions", args.predictions]
                      + (["--questions", args.questions] if args.questions else [])
                      + (["--out", os.path.join(args.out_dir, "vqa_scores.json")] if args.out_dir else []))
        return
    if args.api_base and args.checkpoint:
        p.error("give --checkpoint (our model) or --api_base (a reference model), not both")
    if args.api_base and not args.api_model:
        p.error("--api_base needs --api_model")
    if not args.checkpoint and not args.api_base:
        p.error("--checkpoint is required (except with --vqa_eval, or --api_base for a reference model)")
    one_shot = args.image is not None or args.prompt is not None
    if one_shot and (args.image is None or args.prompt is None):
        p.error("one-shot mode needs both --image and --prompt")
    if one_shot and not args.prompt.strip():   # an empty question reads to the model as "describe it"
        p.error("--prompt is empty: give the question to ask about --image")
    console.quiet_library_bars()
    if args.judge_api_base and not args.judge_model:
        p.error("--judge_api_base needs --judge_model")
    if one_shot or args.vqa or args.captions or args.bench:
        console.set_stream(sys.stderr)  # stdout carries the reply (or the scores JSON) alone
    try:
        bench, judge = check_inputs(args)   # before any model loads
        _run(args, one_shot, bench, judge)
    except (FileNotFoundError, InputError, BenchError) as e:    # a wrong path or file: say which, no traceback
        console.error(str(e))
        sys.exit(2)
    except BenchStopped as e:           # Ctrl-C / SIGTERM: what is kept; 128 + the signal, as training exits
        console.warn(str(e))
        sys.exit(128 + e.signum)
    finally:
        console.set_stream(None)      # in-process callers (tests) get the console back


def _run(args: argparse.Namespace, one_shot: bool, bench: Bench | None, judge: ChatApi | None) -> None:
    assistant = load_assistant(args)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.vqa or args.captions or args.bench:
        if args.api_base:
            out_dir = args.out_dir or os.path.join("runs", "eval", "api_" + re.sub(r"[^\w.-]+", "_", args.api_model))
        else:
            ckpt = os.path.dirname(os.path.abspath(checkpoint_file(args.checkpoint)))   # the step folder
            out_dir = args.out_dir or os.path.join("runs", "eval", "_".join(ckpt.split(os.sep)[-2:]))
        if bench is not None:
            step = getattr(assistant, "meta", {}).get("step", 0)
            scores = run_bench(assistant, bench, out_dir, style=args.bench_prompt, batch_size=args.batch_size,
                               max_new_tokens=args.bench_tokens, lenient=args.extract == "lenient", judge_api=judge,
                               run_dir=args.run_dir, step=step, stop_on_signal=True)
        elif args.vqa:
            root = args.image_root or os.path.dirname(os.path.abspath(args.vqa))
            scores = run_vqa(assistant, args.vqa, root, out_dir, args.batch_size, args.answer_tokens)
        else:
            scores = run_captions(assistant, args.captions, args.caption_prompt, out_dir, args.batch_size,
                                  args.max_new_tokens)
        print(json.dumps(scores, ensure_ascii=False, indent=2))
    elif one_shot:
        try:
            image = assistant.loader(args.image)
        except SampleError as e:
            console.error(f"could not load the image: {e}")
            sys.exit(2)
        try:
            print(assistant.reply(image, [{"role": "user", "content": args.prompt}], **gen))
        except ApiError as e:
            console.error(f"the API gave no answer: {e}")
            sys.exit(3)
    else:
        chat(assistant, gen)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while loading, or in a batch mode: leave without a traceback
        print(file=sys.stderr)
        sys.exit(130)
