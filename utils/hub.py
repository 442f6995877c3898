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
    """One repository into `target`, from ModelScope or the Hugging Face hub. A missing client
    library or a failed download is one line that says what to do, not a traceback."""
    try:
        if source == "modelscope":
            from modelscope import snapshot_download

            snapshot_download(repo, local_dir=target)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(repo, local_dir=target, token=token)
    except ImportError:
        package = "modelscope" if source == "modelscope" else "huggingface_hub"
        raise SystemExit(f"downloading from {source} needs the {package} package: pip install {package}"
                         + (" (or --source hf)" if source == "modelscope" else "")) from None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - offline, a wrong id, a gated repo, a full disk: the hubs raise many types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = {"modelscope": "check the network, or try --source hf",
                "hf": "check the network (a mirror: HF_ENDPOINT=https://hf-mirror.com), the token for gated "
                      "models, or try --source modelscope"}[source]
        raise SystemExit(f"download of {repo} from {source} failed: {type(e).__name__}: {first}. {hint}; "
                         f"the files so far stay in {target} and a rerun continues") from None
