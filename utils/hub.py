"""Model and dataset hubs (ModelScope, the Hugging Face hub) and the HF token. Nothing here runs
during training unless asked for (--download); downloads are an explicit step."""

from __future__ import annotations

import os


def read_hf_token(spec: str | None) -> str | None:
    """A token file path, or the name of an environment variable; None when neither exists.
    A token typed directly (hf_...) works too, but lands in shell history: prefer the file."""
    if not spec:
        return None
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as fh:
            return fh.read().strip() or None
    if spec.startswith("hf_") and spec not in os.environ:
        return spec
    return os.environ.get(spec) or None


def fetch_snapshot(source: str, repo: str, target: str, token: str | None) -> None:
    """One repository into `target`, from ModelScope or the Hugging Face hub."""
    if source == "modelscope":
        from modelscope import snapshot_download

        snapshot_download(repo, local_dir=target)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, local_dir=target, token=token)
