"""Run the code of a checkout (or a copy of it) as the `theychat` package.

The source folders are `daemons/` and `client/`; they are `theychat.daemons` and
`theychat.client` only once installed. A harness that must run a particular copy, not
whatever `theychat` is installed (the benchmarks, the soak of a deliberately broken
copy), lays out a directory that holds `theychat/daemons` and `theychat/client` and puts
it first on the import path of itself and of the daemons it starts (PYTHONPATH, which
every daemon passes on to the ones it spawns).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # this checkout
FOLDERS = {"daemons": "daemons", "client": "client"}  # theychat.<key> is the folder <value>


def link_tree(source: Path = ROOT) -> Path:
    """A directory whose `theychat/` links to `source`'s folders (made once per source)."""
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:10]
    top = Path(tempfile.gettempdir()) / f"tc-code-{os.getuid()}-{tag}"
    pkg = top / "theychat"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, folder in FOLDERS.items():
        link = pkg / name
        if not link.is_symlink():
            link.symlink_to(source / folder, target_is_directory=True)
    return top


def copy_tree(dest: Path, source: Path = ROOT) -> Path:
    """A copy of `source`'s code under `dest/theychat/`, to change without harm; `dest`."""
    for name, folder in FOLDERS.items():
        shutil.copytree(source / folder, dest / "theychat" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def put_first(top: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`top` first on PYTHONPATH of `env` (default: ours, and our own sys.path too)."""
    target = os.environ if env is None else env
    paths = [p for p in target.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(top)]
    target["PYTHONPATH"] = os.pathsep.join([str(top), *paths])
    if env is None and str(top) not in sys.path:
        sys.path.insert(0, str(top))
    return dict(target)


def use_this_checkout() -> None:
    """From now on `theychat` is this checkout's code, here and in every daemon we start.
    Call it before anything imports `theychat`."""
    if "theychat.daemons" in sys.modules:
        loaded = Path(sys.modules["theychat.daemons"].__file__ or "").resolve().parent
        if loaded != ROOT / "daemons":
            raise RuntimeError(f"theychat was imported from {loaded} before "
                               "use_this_checkout(): call it first")
    put_first(link_tree())
