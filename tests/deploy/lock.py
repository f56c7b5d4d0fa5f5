"""requirements.lock from the virtualenv CI tests in: PaySentry's runtime dependencies (no test extras),
their dependencies in turn, each at the version installed. `make lock` writes it; tests/deploy checks it
still matches, so the image (which installs exactly these, --no-deps) runs what CI tested."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

HEADER = """\
# The exact runtime dependencies of PaySentry that CI tested (Python {python}, Linux), installed by
# deploy/Dockerfile with --no-deps. Regenerate after changing pyproject.toml's dependencies: make lock
"""


def _needed(requirement: str, extras: tuple[str, ...]) -> Requirement | None:
    req = Requirement(requirement)
    environment = default_environment()
    if req.marker and not any(req.marker.evaluate({**environment, "extra": e}) for e in ("", *extras)):
        return None
    return req


def runtime_closure(root: str = "paysentry") -> dict[str, str]:
    found: dict[str, str] = {}

    def walk(name: str, extras: tuple[str, ...]) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            return
        dist = metadata.distribution(name)
        found[key] = dist.version
        for requirement in dist.requires or []:
            req = _needed(requirement, extras)
            if req is not None:
                walk(req.name, tuple(req.extras))

    for requirement in metadata.distribution(root).requires or []:
        req = _needed(requirement, ())
        if req is not None:
            walk(req.name, tuple(req.extras))
    return found


def lock_text() -> str:
    python = ".".join(map(str, sys.version_info[:3]))
    pins = "".join(f"{name}=={version}\n" for name, version in sorted(runtime_closure().items()))
    return HEADER.format(python=python) + pins


if __name__ == "__main__":
    sys.stdout.write(lock_text())
