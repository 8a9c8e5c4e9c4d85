"""
Download published checkpoints into models/.

    python scripts/download_models.py 128x128_diffusion 128x128_classifier
    python scripts/download_models.py --all
    python scripts/download_models.py --list

Each file is fetched to ``NAME.pt.part`` with a progress bar and renamed to
``NAME.pt`` only once its size matches what the server announced; an
interrupted download resumes from the partial file (HTTP range request).
The addresses are ``BASE/jul-2021/NAME.pt`` (guided-diffusion) and
``BASE/march-2021/NAME.pt`` (improved-diffusion), with BASE
https://openaipublic.blob.core.windows.net/diffusion unless --base_url or
IMPROVED_DIFFUSION_MODELS_URL says otherwise.
"""

import argparse
import http.client
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion.checkpoints.published import (  # noqa: E402
    DEFAULT_BASE_URL,
    PUBLISHED_CHECKPOINTS,
    checkpoint_url,
)

CHUNK = 1 << 20
BASE_URL_ENV = "IMPROVED_DIFFUSION_MODELS_URL"


class DownloadError(Exception):
    """One checkpoint could not be fetched (the message is one line)."""


def _content_range_total(header):
    # "bytes 100-199/200" or "bytes */200"
    if header and "/" in header:
        total = header.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return None


def remote_size(url, timeout):
    """The size the server announces for `url` (HEAD), or None."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DownloadError(f"{url} was not found (HTTP 404)") from None
        return None  # some servers refuse HEAD; the GET will tell
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None


def download(name, models_dir, base_url=DEFAULT_BASE_URL, timeout=60, progress=True):
    """
    Fetch one published checkpoint into `models_dir`, resuming a ``.part``
    file that an interrupted run left.

    :return: the final path.
    """
    url = checkpoint_url(name, base_url)
    final = os.path.join(models_dir, name + ".pt")
    part = final + ".part"
    total = remote_size(url, timeout)
    if os.path.exists(final):
        size = os.path.getsize(final)
        if total is None or size == total:
            print(f"{final} is already there ({size} bytes)")
            return final
        raise DownloadError(
            f"{final} has {size} bytes but {url} has {total}; delete it and run again"
        )
    os.makedirs(models_dir, exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if total is not None and have > total:
        os.remove(part)
        have = 0
    if total is None or have < total:
        total = _fetch_rest(name, url, part, have, total, timeout, progress)
    size = os.path.getsize(part) if os.path.exists(part) else 0
    if total is not None and size != total:
        raise DownloadError(
            f"{name}: the download stopped at {size} of {total} bytes (kept in {part}); "
            "run the same command again to resume"
        )
    os.replace(part, final)
    print(f"{final}: {size} bytes")
    return final


def _fetch_rest(name, url, part, have, total, timeout, progress):
    """
    Append what `part` lacks (from byte `have`; the whole file when the
    server ignores the range). Returns the file's total size as the server
    gave it (or `total` when it did not say).
    """
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is whole
            return _content_range_total(e.headers.get("Content-Range")) or have
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None
    with resp:
        if have and resp.status == 206:
            start = resp.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if start != str(have):
                raise DownloadError(f"{url} resumed at byte {start}, expected {have}")
            total = _content_range_total(resp.headers.get("Content-Range")) or total
        else:
            have = 0  # the server sent the whole file: start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else total
        _copy_to(resp, part, have, total, name, progress)
    return total


def _copy_to(resp, part, have, total, name, progress):
    """Stream the response into `part` (appended after `have` bytes) until it ends or breaks."""
    from tqdm.auto import tqdm

    with open(part, "ab" if have else "wb") as f, tqdm(
        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
        desc=name, disable=not progress, file=sys.stderr,
    ) as bar:
        while True:
            try:
                block = resp.read(CHUNK)
            except (http.client.IncompleteRead, OSError):
                break  # connection lost: the size check of download() reports it
            if not block:
                break
            try:
                f.write(block)
            except OSError as e:
                raise DownloadError(
                    f"cannot write {part} ({e.strerror or e}); free some space "
                    "and run the same command again to resume"
                ) from None
            bar.update(len(block))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="published checkpoint names, e.g. 128x128_diffusion (see --list)")
    parser.add_argument("--all", action="store_true", help="download every published checkpoint")
    parser.add_argument("--list", action="store_true", help="print the names and addresses")
    parser.add_argument("--models_dir", default="models", help="where to put them (default: models)")
    parser.add_argument("--base_url", default=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    if args.list:
        for name in PUBLISHED_CHECKPOINTS:
            print(f"{name:36s} {checkpoint_url(name, args.base_url)}")
        return 0
    if args.all:
        names = list(PUBLISHED_CHECKPOINTS)
    else:
        names = [n[:-3] if n.endswith(".pt") else n for n in args.names]
    if not names:
        print("error: name at least one checkpoint, or pass --all (--list shows them)", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in PUBLISHED_CHECKPOINTS]
    if unknown:
        print(f"error: unknown checkpoint {unknown[0]}; --list shows the published names",
              file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        try:
            download(name, args.models_dir, args.base_url, timeout=args.timeout)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
