"""Bad input never kills a run and never disappears silently: a sample that cannot be used is
skipped with a reason, counted, and reported with an example."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class SampleError(Exception):
    """A sample that must be skipped; `reason` is the counter key reported by the run and
    `detail` (a path, a URL) the example a message names."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def describe_skips(counts: Counter, examples: dict[str, str] | None = None, limit: int = 4) -> str:
    """'missing_image 37, e.g. /data/x.jpg; corrupt_image 2, e.g. ...': skip counts, most
    frequent first, each with an example when one is known."""
    parts = []
    for reason, n in counts.most_common(limit):
        example = (examples or {}).get(reason)
        parts.append(f"{reason} {n}" + (f", e.g. {example}" if example else ""))
    rest = len(counts) - len(parts)
    return "; ".join(parts) + (f"; {rest} more reason(s)" if rest > 0 else "") if parts else "none"


class Skips(Counter):
    """Skip counts by reason, as a reader returns them, with the first example of each reason
    (a file and its row, or a record id) so a report can say where to look."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str = "") -> None:
        self[reason] += 1
        if example:
            self.examples.setdefault(reason, example)

    def merge(self, other: Counter, prefix: str = "") -> None:
        """Another reader's counts (and examples), their reasons prefixed ("eval/")."""
        for reason, n in other.items():
            self[prefix + reason] += n
        for reason, example in getattr(other, "examples", {}).items():
            self.examples.setdefault(prefix + reason, example)

    def describe(self) -> str:
        return describe_skips(self, self.examples)


@dataclass
class SkipTally:
    """What the loader tried: skip counts by reason (one example each, for messages; records
    skipped while reading are counted here too), samples used and skipped in batches, and
    answers cut by --max_text_len. Training keeps one per rank."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    used: int = 0
    unusable: int = 0           # samples the loader tried and skipped (reading skips not included)
    truncated: int = 0

    def add(self, batch: dict) -> None:
        """A collated batch's counts (dataset.collate: skipped, skip_examples, size, truncated)."""
        self.skipped.update(batch["skipped"])
        self.unusable += sum(batch["skipped"].values())
        for reason, example in batch.get("skip_examples", {}).items():
            self.examples.setdefault(reason, example)
        self.used += batch["size"]
        self.truncated += batch["truncated"]

    def add_skip(self, item: dict) -> None:
        """One skipped sample, as the dataset returns it ({"skip": reason, "detail": ...})."""
        self.add({"skipped": Counter([item["skip"]]), "skip_examples": {item["skip"]: item.get("detail", "")},
                  "size": 0, "truncated": 0})

    def describe(self) -> str:
        return describe_skips(self.skipped, self.examples)
