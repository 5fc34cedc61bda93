#!/usr/bin/env python3
"""Runs the build stage of deploy/Dockerfile without a container engine.

CI has no Docker engine, yet the image must keep building: this script reads the Dockerfile's
build stage (`FROM ... AS build` up to the next `FROM`) and carries out its instructions on
this machine, in a scratch directory that stands for the image's filesystem:

  WORKDIR /src   -> target/dockerfile-stage/src (kept between runs, so cargo builds incrementally)
  COPY a b       -> copies a from the repository (honouring .dockerignore) to b under WORKDIR
  ENV / ARG      -> environment of the following RUN lines
  RUN cmd        -> `sh -ec cmd` in WORKDIR

so that a file the build needs but the Dockerfile does not copy, or a RUN line that fails, fails
here as it would in `docker build`. The commands are the Dockerfile's own, as written; only the
release profile is made cheaper through cargo's environment (no LTO, opt-level 1, parallel
codegen), which changes how long the build takes, not what it needs. `--exact` keeps the
Dockerfile's profile; `--dry-run` prints the plan without running it.

  python3 scripts/dockerfile-build.py [--dry-run] [--exact] [--dockerfile deploy/Dockerfile]
"""

import argparse
import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHEAP_RELEASE = {
    "CARGO_PROFILE_RELEASE_LTO": "false",
    "CARGO_PROFILE_RELEASE_OPT_LEVEL": "1",
    "CARGO_PROFILE_RELEASE_CODEGEN_UNITS": "16",
    "CARGO_PROFILE_RELEASE_DEBUG": "0",
    "CARGO_PROFILE_RELEASE_INCREMENTAL": "true",
}


def instructions(text):
    """(keyword, argument) of every instruction, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not cur and (not stripped or stripped.startswith("#")):
            continue
        if cur and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            cur += stripped[:-1] + " "
            continue
        cur += stripped
        keyword, _, arg = cur.partition(" ")
        out.append((keyword.upper(), arg.strip()))
        cur = ""
    return out


def build_stage(steps, name):
    """The instructions of stage `name` (after its FROM, up to the next FROM)."""
    stage, inside = [], False
    for keyword, arg in steps:
        if keyword == "FROM":
            words = arg.split()
            inside = len(words) >= 3 and words[-2].upper() == "AS" and words[-1] == name
            continue
        if inside:
            stage.append((keyword, arg))
    if not stage:
        sys.exit(f"dockerfile-build: no stage named {name!r}")
    return stage


def ignore_patterns():
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    pats = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line.rstrip("/"))
    return pats


def ignored(rel, pats):
    """Whether the repository path `rel` (or a folder above it) is excluded by .dockerignore."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for p in pats:
            if fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i - 1], p[3:])):
                return True
    return False


def copy(sources, dest, workdir, stage_root, pats, dry):
    target = Path(dest) if dest.startswith("/") else Path(workdir) / dest
    target = stage_root / str(target).lstrip("/")
    into_dir = dest.endswith("/") or len(sources) > 1
    for src in sources:
        origin = ROOT / src
        if not origin.exists():
            sys.exit(f"dockerfile-build: COPY {src}: no such file in the build context")
        if ignored(src.rstrip("/"), pats):
            sys.exit(f"dockerfile-build: COPY {src}: excluded by .dockerignore")
        to = target / origin.name if into_dir else target
        print(f"   copy {src} -> {to.relative_to(stage_root)}")
        if dry:
            continue
        if origin.is_dir():
            if to.exists():
                shutil.rmtree(to)
            for dirpath, dirnames, filenames in os.walk(origin):
                rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
                dirnames[:] = [d for d in dirnames if not ignored(f"{rel_dir}/{d}", pats)]
                for f in filenames:
                    rel = f"{rel_dir}/{f}"
                    if ignored(rel, pats):
                        continue
                    out = to / Path(dirpath).relative_to(origin) / f
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / rel, out)
        else:
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, to)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dockerfile", default="deploy/Dockerfile")
    ap.add_argument("--stage", default="build")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--exact", action="store_true", help="keep the Dockerfile's release profile")
    args = ap.parse_args()

    stage = build_stage(instructions((ROOT / args.dockerfile).read_text()), args.stage)
    stage_root = ROOT / "target" / "dockerfile-stage"
    pats = ignore_patterns()
    env = dict(os.environ)
    if not args.exact:
        env.update(CHEAP_RELEASE)
    workdir = "/"
    if not args.dry_run:
        # A fresh image filesystem each run, but the build's target/ is kept (incremental).
        for child in stage_root.glob("*") if stage_root.exists() else []:
            for grand in child.iterdir() if child.is_dir() else []:
                if grand.name != "target":
                    shutil.rmtree(grand) if grand.is_dir() and not grand.is_symlink() else grand.unlink()
    for keyword, arg in stage:
        print(f"== {keyword} {arg}")
        if keyword == "WORKDIR":
            workdir = arg if arg.startswith("/") else str(Path(workdir) / arg)
            if not args.dry_run:
                (stage_root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            words = [w for w in shlex.split(arg) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(arg)):
                sys.exit("dockerfile-build: COPY --from in the build stage is not supported")
            copy(words[:-1], words[-1], workdir, stage_root, pats, args.dry_run)
        elif keyword in ("ENV", "ARG"):
            for pair in shlex.split(arg):
                key, _, value = pair.partition("=")
                if value or keyword == "ENV":
                    env[key] = value
        elif keyword == "RUN":
            if args.dry_run:
                continue
            cwd = stage_root / workdir.lstrip("/")
            r = subprocess.run(["sh", "-ec", arg], cwd=cwd, env=env)
            if r.returncode != 0:
                sys.exit(f"dockerfile-build: RUN failed with status {r.returncode}: {arg}")
        else:
            sys.exit(f"dockerfile-build: {keyword} in the build stage is not supported here")
    print("dockerfile-build: the build stage of", args.dockerfile, "built" if not args.dry_run else "is planned")


if __name__ == "__main__":
    main()
