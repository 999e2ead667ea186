#!/usr/bin/env python3
"""Serve the host's local pip package directories on 127.0.0.1 for an image build (stdlib only).

An image build cannot see the host's disk, so an index configured as `file:///srv/pypi/simple` or a
`find-links` directory (see `pip config list`) is unreachable from `RUN pip install`. This reads the host's
pip settings (`python3 -m pip config list`, overridden by PIP_INDEX_URL / PIP_EXTRA_INDEX_URL /
PIP_FIND_LINKS in the environment), serves every local entry read-only over HTTP on 127.0.0.1 (a
`--network host` build reaches it; pip treats loopback as a secure origin), prints the settings the build
should use as shell assignments, then serves until killed (on $HIERMEM_PIP_INDEX_PORT, default 38141: the
URLs are build args, so a port that changes would invalidate the image's build cache):

    python3 deploy/pip-index.py > /tmp/pip.env &      # first lines: HIERMEM_PIP_*=...; then it serves
    HIERMEM_PIP_INDEX_URL=https://pypi.org/simple
    HIERMEM_PIP_EXTRA_INDEX_URL='http://127.0.0.1:38141/0/simple/ ...'
    HIERMEM_PIP_FIND_LINKS=http://127.0.0.1:38141/2/
    HIERMEM_PIP_INDEX_READY=1

A local index `DIR/simple` is served from DIR (a PEP 503 page may link to `../../files/...`); a find-links
directory is served as itself (its listing is the page pip reads). Remote URLs are passed through unchanged.
Nothing outside those directories is served.
"""

from __future__ import annotations

import functools
import http.server
import os
import posixpath
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path


def pip_settings() -> dict[str, list[str]]:
    """index-url, extra-index-url and find-links of the host's pip (config files, then environment)."""
    found: dict[str, list[str]] = {"index-url": [], "extra-index-url": [], "find-links": []}
    pip = shlex.split(os.environ.get("HIERMEM_HOST_PIP", f"{sys.executable} -m pip"))
    try:
        out = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    # `pip config list` prints `global.find-links='/opt/wheels'`, `:env:.find-links=...`; later files win
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in found and key.split(".", 1)[0] != ":env:":
            found[name] = value.strip().strip("'\"").split()
    for name in found:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env is not None:
            found[name] = env.split()
    return found


def local_dir(entry: str) -> Path | None:
    """The directory behind a file:// URL or a path; None for remote URLs."""
    if entry.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(entry).path))
    if "://" not in entry:
        return Path(entry)
    return None


class Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD under /<n>/... map to roots[n]; everything else is 404. Quiet."""

    roots: list[Path] = []

    def translate_path(self, path: str) -> str:
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = [p for p in posixpath.normpath(path).split("/") if p not in ("", ".", "..")]
        if not parts or not parts[0].isdigit() or int(parts[0]) >= len(self.roots):
            return "/nonexistent-hiermem-pip-index"
        return str(self.roots[int(parts[0])].joinpath(*parts[1:]))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


def main() -> None:
    settings = pip_settings()
    roots: list[Path] = []
    # A fixed port: the URLs become build args, and a changed build arg invalidates the image's build cache.
    port = int(os.environ.get("HIERMEM_PIP_INDEX_PORT", "38141"))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler))
    except OSError as exc:
        print(f"# port {port} busy ({exc}): a free one is used, so the build cache is not reused", file=sys.stderr)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def serve(entry: str, index: bool) -> str | None:
        d = local_dir(entry)
        if d is None:
            return entry
        if not d.is_dir():
            print(f"# skipped {entry}: not a directory", file=sys.stderr)
            return None
        if index and d.name == "simple":
            roots.append(d.parent)
            return f"{base}/{len(roots) - 1}/simple/"
        roots.append(d)
        return f"{base}/{len(roots) - 1}/"

    index = [u for u in (serve(e, True) for e in settings["index-url"][:1]) if u]
    extra = [u for u in (serve(e, True) for e in settings["extra-index-url"]) if u]
    links = [u for u in (serve(e, False) for e in settings["find-links"]) if u]
    Handler.roots = roots
    out = {
        "HIERMEM_PIP_INDEX_URL": index[0] if index else "https://pypi.org/simple",
        "HIERMEM_PIP_EXTRA_INDEX_URL": " ".join(extra),
        "HIERMEM_PIP_FIND_LINKS": " ".join(links),
        "HIERMEM_PIP_INDEX_READY": "1",
    }
    for k, v in out.items():
        print(f"{k}={shlex.quote(v)}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
