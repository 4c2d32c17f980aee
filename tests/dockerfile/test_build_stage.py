"""The Dockerfile builds: its build stage's exact file set (parsed from its COPY
lines) in an otherwise empty directory, and its RUN commands run there as
written. No container engine runs on the development machines, so this is the
build stage without the engine: what it cannot see is the base image itself
(checked below only by its tag).

The directory is at a fixed place under target/ and its target/ is a link to
target/dockerfile-build, so dependencies compile once and later runs rebuild
only this crate, in release as the Dockerfile does (8 CPU-minutes cold, 4.5
warm: so `.ci/run` runs this after scripts/test, not scripts/test itself).
Everything the Dockerfile copies is copied afresh each run, so a file it
forgets is missed here as in `docker build`. The .dockerignore is applied as
Docker applies it."""

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
CONTEXT = os.path.join(ROOT, "target", "dockerfile-context")
CACHE = os.path.join(ROOT, "target", "dockerfile-build")


def instructions(text):
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    assert not cur, "the Dockerfile ends inside a continued line"
    return out


def stages(text):
    """{stage name: [(INSTRUCTION, arguments), ...]}, FROM first."""
    result, name = {}, None
    for i, (word, rest) in enumerate(instructions(text)):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(result))
            result[name] = []
        if name is not None:
            result[name].append((word, rest))
    return result


def copy_args(rest):
    """COPY's sources and destination (shell or JSON form); flags other than
    --from are refused so that the test never silently ignores one."""
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    words = [w for w in words if not w.startswith("--")]
    for f in flags:
        assert f.startswith("--from="), f"COPY {f} is not understood by this test: extend it"
    return flags, words[:-1], words[-1]


def build_stage():
    with open(DOCKERFILE) as f:
        all_stages = stages(f.read())
    assert "build" in all_stages, "the Dockerfile has no stage named build"
    return all_stages


def dockerignore():
    path = os.path.join(ROOT, ".dockerignore")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return parse_dockerignore(f.read())


def parse_dockerignore(text):
    """A .dockerignore as (exception, regex) pairs: `*` and `?` within one
    path segment, `**` across segments, `!` re-includes, last match wins."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                rx += ".*"
                i += 2
            elif pattern[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                assert pattern[i] not in "[\\", f".dockerignore {line}: not understood by this test"
                rx += re.escape(pattern[i])
                i += 1
        rules.append((exception, re.compile(rx + "(/.*)?")))
    return rules


def ignored(rel, rules):
    """Whether the context path `rel` is left out of the build context."""
    out = False
    for exception, rx in rules:
        if rx.fullmatch(rel):
            out = not exception
    return out


def copy_into_context(src, to, into_dir, rules):
    """COPY src to (a context path): a directory's contents, or one file."""
    from_path = os.path.join(ROOT, src)
    rel = os.path.normpath(src)
    assert os.path.exists(from_path) and not ignored(rel, rules), (
        f"COPY {src}: not in the build context"
    )
    if os.path.isfile(from_path):
        if into_dir:
            os.makedirs(to, exist_ok=True)
            to = os.path.join(to, os.path.basename(src))
        shutil.copy2(from_path, to)
        return
    for dirpath, dirnames, filenames in os.walk(from_path):
        here = os.path.relpath(dirpath, from_path)
        os.makedirs(os.path.normpath(os.path.join(to, here)), exist_ok=True)
        for name in filenames:
            if not ignored(os.path.normpath(os.path.join(rel, here, name)), rules):
                shutil.copy2(
                    os.path.join(dirpath, name), os.path.normpath(os.path.join(to, here, name))
                )


def test_dockerignore_rules_match_as_docker_matches():
    rules = parse_dockerignore("# build output\n/target\nsrc/*.bak\n\ntests/**/*.json\n")
    assert ignored("target", rules) and ignored("target/debug/x", rules)
    assert ignored("src/a.bak", rules) and not ignored("src/a/b.bak", rules)
    assert not ignored("src/main.rs", rules) and not ignored("targets", rules)
    assert ignored("tests/data/a.json", rules) and not ignored("tests/data/a.rs", rules)
    rules += parse_dockerignore("!target/keep")
    assert ignored("target/x", rules) and not ignored("target/keep/x", rules)


def test_the_build_stages_file_set_builds_with_its_command():
    all_stages = build_stage()
    rules = dockerignore()
    workdir = None
    if os.path.lexists(CONTEXT):
        shutil.rmtree(CONTEXT)
    os.makedirs(CONTEXT)
    os.makedirs(CACHE, exist_ok=True)
    os.symlink(CACHE, os.path.join(CONTEXT, "target"))

    def inside(path):
        assert workdir, "a COPY or RUN before WORKDIR: extend this test"
        path = os.path.normpath(os.path.join(workdir, path))
        assert path == workdir or path.startswith(workdir + "/"), path
        return os.path.join(CONTEXT, os.path.relpath(path, workdir))

    ran = 0
    for word, rest in all_stages["build"][1:]:
        if word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            flags, sources, dest = copy_args(rest)
            assert not flags, f"COPY {rest}: copies from another stage"
            into_dir = dest.endswith("/") or len(sources) > 1
            for src in sources:
                copy_into_context(src, inside(dest), into_dir, rules)
        elif word == "RUN":
            r = subprocess.run(
                ["sh", "-c", rest], cwd=CONTEXT, capture_output=True, text=True
            )
            assert r.returncode == 0, f"RUN {rest}\n{r.stdout}\n{r.stderr[-6000:]}"
            ran += 1
        else:
            pytest.fail(f"{word} in the build stage is not understood by this test: extend it")
    assert ran >= 1, "the build stage runs no command"

    # What the next stage copies out of the build stage exists.
    copied = 0
    for name, instrs in all_stages.items():
        for word, rest in instrs:
            if word == "COPY" and "--from=build" in rest:
                _, sources, _ = copy_args(rest)
                for src in sources:
                    assert os.path.isfile(inside(src)), f"COPY --from=build {src}: not built"
                    copied += 1
    assert copied >= 1, "no stage copies the binary out of the build stage"


def rust_version_of(image):
    m = re.match(r"rust:(\d+)\.(\d+)", image)
    assert m, f"{image}: not a rust:X.Y image"
    return int(m.group(1)), int(m.group(2))


def test_the_base_images_match_the_crate_and_each_other():
    all_stages = build_stage()
    build_image = all_stages["build"][0][1].split()[0]
    runtime_image = list(all_stages.values())[-1][0][1].split()[0]
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        m = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', f.read(), re.M)
    assert m, "Cargo.toml has no rust-version"
    assert rust_version_of(build_image) >= (int(m.group(1)), int(m.group(2))), build_image
    # The binary links the build image's glibc: the runtime image must be the
    # same Debian release.
    debian = {"bookworm": "12", "trixie": "13"}
    codename = re.search(r"-(bookworm|trixie)\b", build_image)
    assert codename, f"{build_image}: name the Debian release, as the runtime image does"
    assert f"debian{debian[codename.group(1)]}" in runtime_image, (build_image, runtime_image)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"`{build_image}`" in f.read(), f"the README does not name {build_image}"
