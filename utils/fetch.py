"""Bounded URL fetching, shared by the dataset (images named by URL) and scripts/prepare_sa1b.py.

http(s) only, redirects included; a timeout, a byte cap, a content-type check (an error page
served with 200 is not an image), retries with backoff only where they can help (not after a
404), and an optional on-disk cache so that later epochs never refetch.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request

from utils.atomic import atomic_write
from utils.skips import SampleError


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp://); loops stop at 10."""

    max_redirections = 10

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL: {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def cache_path(cache_dir: str | None, url: str) -> str | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(url.encode()).hexdigest()
    return os.path.join(cache_dir, digest[:2], digest)


def fetch(url: str, timeout: float = 10.0, retries: int = 3, max_bytes: int = 50 * 2**20, backoff: float = 0.5,
          cache_dir: str | None = None) -> bytes:
    """The body of an http(s) URL, or SampleError: url_error (after retries), url_too_large,
    url_not_image. `backoff` seconds before the 2nd try, doubling after."""
    cached = cache_path(cache_dir, url)
    if cached and os.path.isfile(cached):
        with open(cached, "rb") as fh:
            return fh.read()
    last = ""
    for attempt in range(retries):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "llava-stage1/1.0"})
            with _OPENER.open(req, timeout=timeout) as resp:
                kind = resp.headers.get_content_type()
                data = resp.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise SampleError("url_too_large", f"{url}: over {max_bytes} bytes")
            if kind.startswith("text/"):  # an error or login page served with 200
                raise SampleError("url_not_image", f"{url}: {kind}")
            if cached:
                atomic_write(cached, data)
            return data
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if 400 <= e.code < 500 and e.code != 429:
                break  # a 404 will not heal with retries
        except SampleError:
            raise
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
        if attempt + 1 < retries:
            time.sleep(backoff * 2**attempt)
    raise SampleError("url_error", f"{url}: {last}")


def file_md5(path: str) -> str:
    """The hex MD5 of a file, read in 1 MiB blocks (VLMEvalKit lists its benchmark files by MD5)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
