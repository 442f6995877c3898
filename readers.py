"""Readers for each on-disk format: every one turns its files into Records (one image, or
none for a text-only record, and a caption or LLaVA-style conversations) and counts what it
could not use, by reason. How a Record becomes token ids is prompts.py's; images are loaded
later, by dataset.py.

    sa1b        SA1B-Dense-Caption parquet shards ({root}/data/*.parquet: url, cap_seg)
    chat        a LLaVA chat.json (llava_v1_5_mix665k, LLaVA-Instruct-150K, convert_vqa.py's)
    cogvlm_sft  CogVLM-SFT-311K ({root}/<subset>/images + <subset>/labels_zh)

validate_chat_json is the align plan's checklist on a converted chat.json (convert_vqa.py runs it
on every file it writes, and on any file with --validate-only).
"""

from __future__ import annotations

import ast
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

from prompts import IMAGE_PLACEHOLDER, with_image_placeholder
from utils.skips import SampleError, Skips


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) -> chat messages ({"role", "content"})."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for turn in conversations:
        role = roles.get(turn.get("from", turn.get("role")))
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise SampleError("bad_conversation", f"turn {turn!r}")
        out.append({"role": role, "content": content})
    return out


@dataclass
class Record:
    """One raw sample before its image is loaded. Exactly one of `caption`/`conversations`;
    `image` is "" for a text-only record (LLaVA's mix665k has ~40k)."""

    image: str
    caption: str | None = None
    conversations: list | None = None
    meta: dict = field(default_factory=dict)


def parse_cap_seg(value: Any) -> str:
    """SA1B-Dense-Caption's `cap_seg` (a dict, or its JSON/Python-literal string) -> global_caption."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise SampleError("bad_cap_seg", str(e)[:80]) from None
    if not isinstance(value, dict) or not isinstance(value.get("global_caption"), str):
        raise SampleError("bad_cap_seg", "no global_caption")
    caption = value["global_caption"].strip()
    if not caption:
        raise SampleError("empty_caption")
    return caption


def sa1b_shards(data_root: str) -> list[str]:
    """The course layout `{root}/data/*.parquet`, or parquet files directly under root."""
    shards = sorted(glob.glob(os.path.join(data_root, "data", "*.parquet")))
    shards = shards or sorted(glob.glob(os.path.join(data_root, "*.parquet")))
    if not shards:
        raise FileNotFoundError(f"no parquet shards in {data_root}/data/ or {data_root}/")
    return shards


def sa1b_rows(data_root: str, max_samples: int = 0) -> tuple[list[tuple[str, Any, str]], Skips]:
    """SA1B-Dense-Caption parquet shards (`url`, `cap_seg`) -> (url, raw cap_seg, caption) of the
    usable rows in shard order, and skip counts (an example each: shard and row). Stops at
    `max_samples` usable rows (the course's first-100k subset). Shared by training's reader and
    scripts/prepare_sa1b.py."""
    import pyarrow.parquet as pq

    rows: list[tuple[str, Any, str]] = []
    skipped = Skips()
    for shard in sa1b_shards(data_root):
        try:
            table = pq.read_table(shard, columns=None)
        except Exception as e:  # pyarrow raises several types for truncated files
            raise ValueError(f"{shard}: unreadable parquet shard ({e})") from None
        missing = {"url", "cap_seg"} - set(table.column_names)
        if missing:
            raise ValueError(f"{shard}: missing column(s) {sorted(missing)}; have {table.column_names}")
        for row, (url, cap) in enumerate(zip(table.column("url").to_pylist(), table.column("cap_seg").to_pylist())):
            if max_samples and len(rows) >= max_samples:
                return rows, skipped
            try:
                if not isinstance(url, str) or not url.strip():
                    raise SampleError("bad_record", "empty url")
                rows.append((url.strip(), cap, parse_cap_seg(cap)))
            except SampleError as e:
                skipped.add(e.reason, where(f"{shard} row {row}", e))
    return rows, skipped


def read_sa1b(data_root: str, max_samples: int = 0) -> tuple[list[Record], Skips]:
    """SA1B-Dense-Caption shards -> records, skip counts.

    `url` may be http(s), file:// or a path relative to `data_root`.
    """
    rows, skipped = sa1b_rows(data_root, max_samples)
    return [Record(image=url, caption=caption) for url, _, caption in rows], skipped


def read_chat_json(chat_json: str, max_samples: int = 0) -> tuple[list[Record], Skips]:
    """A LLaVA chat.json (list of {"image", "conversations"}) -> records, skip counts (an example
    each: the record's position in the file, and its id when it has one)."""
    if not os.path.isfile(chat_json):
        raise FileNotFoundError(f"no chat.json at {chat_json}")
    with open(chat_json, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except ValueError as e:
            raise ValueError(f"{chat_json}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{chat_json}: expected a JSON list of records, got {type(data).__name__}")
    records: list[Record] = []
    skipped = Skips()
    for i, item in enumerate(data):
        if max_samples and len(records) >= max_samples:
            break
        try:
            if not isinstance(item, dict):
                raise SampleError("bad_record", "not an object")
            image = item.get("image", "")  # no "image" key: a text-only record
            if not isinstance(image, str):
                raise SampleError("bad_record", f"image {image!r}")
            conv = item.get("conversations")
            if not isinstance(conv, list) or len(conv) < 2:
                raise SampleError("bad_conversation", "fewer than 2 turns")
            messages = checked_turns(to_messages(conv))
            if not image and any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
                raise SampleError("placeholder_without_image", "an <image> placeholder but no image")
            meta = {k: v for k, v in item.items() if k not in ("image", "conversations")}
            records.append(Record(image=image, conversations=messages, meta=meta))
        except SampleError as e:
            record_id = item.get("id") if isinstance(item, dict) else None
            skipped.add(e.reason, where(f"{chat_json} record {i}" + (f" (id {record_id})" if record_id is not None
                                                                     else ""), e))
    return records, skipped


def where(place: str, e: SampleError) -> str:
    """A skip's example for a report: the place, then what was wrong there."""
    return f"{place}: {e.detail}" if e.detail else place


def checked_turns(messages: list[dict]) -> list[dict]:
    """user/assistant alternating, starting with the user and ending with an answer."""
    if [m["role"] for m in messages] != ["user", "assistant"] * (len(messages) // 2) or len(messages) % 2:
        raise SampleError("bad_roles", str([m["role"] for m in messages]))
    return messages


# CogVLM-SFT-311K's dialogue subsets, the ones the course's stage 2 trains on (its third,
# llava_details-minigpt4_3500_formate, holds long descriptions under "captions").
COGVLM_SUBSETS = ("llava_instruction_single_conversation_formate", "llava_instruction_multi_conversations_formate")


def read_cogvlm_sft(data_root: str, labels: str = "labels_zh", max_samples: int = 0,
                    subsets: tuple[str, ...] = COGVLM_SUBSETS) -> tuple[list[Record], Skips]:
    """CogVLM-SFT-311K: `<root>/<subset>/images/<stem>.jpg` + `<root>/<subset>/<labels>/<stem>.json`
    holding {"conversations": [{"role", "content"}, ...]} (labels_zh Chinese, labels English).
    The text has no `<image>`: it goes before the first user turn's text, where eval_llava.py
    puts it in a chat. A label file without its image is counted ("label_without_image")."""
    records: list[Record] = []
    skipped = Skips()
    found = [s for s in subsets if os.path.isdir(os.path.join(data_root, s, labels))]
    if not found:
        raise FileNotFoundError(f"no CogVLM-SFT subset with a {labels}/ folder under {data_root} "
                                f"(looked for {', '.join(subsets)})")
    for subset in found:
        for label in sorted(glob.glob(os.path.join(data_root, subset, labels, "*.json"))):
            if max_samples and len(records) >= max_samples:
                return records, skipped
            stem = os.path.splitext(os.path.basename(label))[0]
            image = os.path.join(subset, "images", f"{stem}.jpg")
            try:
                if not os.path.isfile(os.path.join(data_root, image)):
                    raise SampleError("label_without_image", f"no {image}")
                try:
                    with open(label, encoding="utf-8") as fh:
                        item = json.load(fh)
                except (OSError, ValueError) as e:
                    raise SampleError("bad_label_file", str(e)) from None
                conv = item.get("conversations") if isinstance(item, dict) else None
                if not isinstance(conv, list) or len(conv) < 2:
                    raise SampleError("bad_conversation", "fewer than 2 turns")
                messages = with_image_placeholder(checked_turns(to_messages(conv)))
                records.append(Record(image=image, conversations=messages, meta={"subset": subset, "id": stem}))
            except SampleError as e:
                skipped.add(e.reason, where(label, e))
    return records, skipped


def read_records(data_format: str, data_root: str = "", chat_json: str = "",
                 max_samples: int = 0, labels: str = "labels_zh") -> tuple[list[Record], Skips, str]:
    """Dispatch on --data_format. Returns (records, skip counts, image root)."""
    if data_format == "cogvlm_sft":
        records, skipped = read_cogvlm_sft(data_root, labels, max_samples)
        return records, skipped, data_root
    if data_format == "sa1b":
        records, skipped = read_sa1b(data_root, max_samples)
        return records, skipped, data_root
    if data_format == "chat":
        path = chat_json or os.path.join(data_root, "chat.json")
        records, skipped = read_chat_json(path, max_samples)
        return records, skipped, data_root or os.path.dirname(os.path.abspath(path))
    raise ValueError(f"unknown data format {data_format!r} (sa1b | chat | cogvlm_sft)")


DATA_FORMATS = ("sa1b", "chat", "cogvlm_sft")


def validate_chat_json(path: str, image_root: str) -> list[str]:
    """The align plan's checklist on a chat.json; returns problems (empty list: fine).

    JSON list, non-empty; each record has an `image` that exists under `image_root` and
    `conversations` of exactly two turns, human (holding one `<image>`) then gpt (non-empty).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return [f"{path}: unreadable or not valid JSON ({e})"]
    if not isinstance(data, list):
        return [f"{path}: expected a JSON list of records, got {type(data).__name__}"]
    if not data:
        return [f"{path}: no records"]
    problems: list[str] = []
    seen_ids: set = set()
    exists: dict[str, bool] = {}
    for i, rec in enumerate(data):
        where = f"record {i}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: not an object")
            continue
        if "id" in rec:
            where = f"record {i} ({rec['id']})"
            if rec["id"] in seen_ids:
                problems.append(f"{where}: duplicate id")
            seen_ids.add(rec["id"])
        image, conv = rec.get("image"), rec.get("conversations")
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: no `image`")
        else:
            full = os.path.join(image_root, image)
            if full not in exists:
                exists[full] = os.path.isfile(full)  # follows symlinks: a dangling link is missing
            if not exists[full]:
                problems.append(f"{where}: image {image} not found under {image_root}")
        if not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(t, dict) for t in conv):
            problems.append(f"{where}: `conversations` must be exactly 2 turns")
            continue
        (h, g) = conv
        if h.get("from") != "human" or g.get("from") != "gpt":
            problems.append(f"{where}: turns must be human then gpt, got {[h.get('from'), g.get('from')]}")
            continue  # the content checks below would only repeat this one
        hv, gv = h.get("value"), g.get("value")
        if not isinstance(hv, str) or hv.count(IMAGE_PLACEHOLDER) != 1:
            problems.append(f"{where}: the human turn must hold exactly one {IMAGE_PLACEHOLDER}")
        if not isinstance(gv, str) or not gv.strip():
            problems.append(f"{where}: empty gpt answer")
    return problems
