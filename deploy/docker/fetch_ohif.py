"""Fetch the prebuilt OHIF viewer for the radloop image: the `dist` folder of an @ohif/app
release from the npm registry, checked against a pinned integrity before it is unpacked (as
scripts/bootstrap does with npm for a checkout). Standard library only: it runs in the image
build before radloop is installed.

  python fetch_ohif.py --version 3.13.2 --integrity sha512-... --to /opt/radloop/ohif
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

DIST = "package/dist/"


def fetch(registry: str, version: str) -> bytes:
    url = f"{registry.rstrip('/')}/@ohif/app/-/app-{version}.tgz"
    with urllib.request.urlopen(url, timeout=300) as response:
        return bytes(response.read())


def integrity_of(data: bytes) -> str:
    """npm's `integrity` string (Subresource Integrity, sha512) of a tarball."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def unpack_dist(data: bytes, target: Path) -> int:
    """Unpack `package/dist/**` into `target`; returns the number of files."""
    count = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if not member.name.startswith(DIST) or not member.isfile():
                continue
            member.name = member.name.removeprefix(DIST)
            # The "data" filter refuses absolute paths, `..` and links out of the target.
            archive.extract(member, target, filter="data")
            count += 1
    return count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True)
    parser.add_argument("--integrity", required=True)
    parser.add_argument("--registry", default="https://registry.npmjs.org")
    parser.add_argument("--to", type=Path, required=True)
    args = parser.parse_args(argv)
    data = fetch(args.registry, args.version)
    got = integrity_of(data)
    if got != args.integrity:
        sys.stderr.write(f"@ohif/app@{args.version}: integrity mismatch ({got})\n")
        return 1
    count = unpack_dist(data, args.to)
    if not (args.to / "index.html").is_file():
        sys.stderr.write(f"@ohif/app@{args.version}: no dist/index.html in the package\n")
        return 1
    sys.stdout.write(f"OHIF {args.version}: {count} files in {args.to}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
