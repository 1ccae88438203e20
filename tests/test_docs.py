"""The documentation runs as written: README.md's and docs/'s offline code blocks, the
sample inputs of examples/, and every path the READMEs name.

A fenced ``python`` or ``sh`` block whose first line is ``# offline`` must run offline, from
the repository's root, with nothing but examples/ (tiny models, random weights). The
blocks of a file run in order in one temporary folder holding a copy of examples/, so
two blocks writing the same output name fail (the CLI never overwrites).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = "# offline"
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def offline_blocks(doc: str):
    """``[(line, language, code)]``: the fenced blocks of ``doc`` whose first line is ``# offline``."""
    blocks = []
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if fence:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            body = lines[i + 1:j]
            if body and body[0].strip() == OFFLINE:
                blocks.append((i + 1, fence.group(1), "\n".join(body) + "\n"))
            i = j
        i += 1
    return blocks


def shell_commands(code: str):
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_the_readme_has_offline_blocks_for_every_quickstart_level():
    languages = [lang for _, lang, _ in offline_blocks("README.md")]
    codes = " ".join(code for _, _, code in offline_blocks("README.md"))
    assert languages.count("python") >= 3 and "sh" in languages
    for name in ("AnyMSStableDiffusionXLPipeline", "anyms_attention", "region_cross_attention",
                 "anyms generate"):
        assert name in codes, name


def test_the_readme_runs_an_example_of_every_control():
    """Each control a subject or a run has appears in an offline block of the README (which
    test_offline_blocks_run_as_written runs): timing, schedules, blocks (pipeline and command
    line), negative images, --max-memory and upscaling (the function and the option)."""
    codes = " ".join(code for _, _, code in offline_blocks("README.md"))
    for control in ("start=", "end=", "schedule=", "blocks=", "--blocks", "negative_image=", "--max-memory",
                    "tiled_upscale(", "--upscale", "examples/timed_layout.json", "examples/blocks_layout.json"):
        assert control in codes, control


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if offline_blocks(d)])
def test_offline_blocks_run_as_written(doc, tmp_path, monkeypatch, capsys):
    from anyms import cli

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for line, language, code in offline_blocks(doc):
        where = f"{doc}:{line}"
        if language == "python":
            exec(compile(code, where, "exec"), {"__name__": "__main__"})
        elif language in ("sh", "bash", "shell"):
            for argv in shell_commands(code):
                if argv[0] == "anyms":
                    status = cli.main(argv[1:])
                    assert status == 0, f"{where}: {shlex.join(argv)} exited {status}: {capsys.readouterr().err}"
                elif argv[0] == "python":
                    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": str(ROOT)})
                    assert done.returncode == 0, f"{where}: {shlex.join(argv)}: {done.stderr[-2000:]}"
                else:
                    pytest.fail(f"{where}: an offline block runs only anyms and python commands, not {argv[0]}")
        else:
            pytest.fail(f"{where}: an offline block must be python or sh, not {language}")
    # what the blocks promise to write is there
    written = {p.name for p in tmp_path.rglob("*.png") if "examples" not in p.parts}
    if doc == "README.md":
        for name in ("quickstart-pipeline.png", "quickstart-processor.png", "sofa.png", "sofa.routing.png",
                     "sofa-from-layout.png", "sofa-7.png", "garden.png", "rug.png"):
            assert name in written, name


def test_the_examples_are_what_their_script_makes(tmp_path):
    """examples/ holds exactly what examples/make_examples.py makes (pixels and text)."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "make_examples.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # and --check can fail: a changed pixel is found
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    from PIL import Image

    with Image.open(tmp_path / "examples" / "cat_mask.png") as im:
        im = im.copy()
    im.putpixel((0, 0), 255)
    im.save(tmp_path / "examples" / "cat_mask.png")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "make_examples.py"), "--check",
                           "--out-dir", str(tmp_path / "examples")], capture_output=True, text=True)
    assert done.returncode == 1 and "cat_mask.png" in done.stderr


# ------------------------------------------------------------------ every named path exists
_TOP = ("anyms", "anyms_kernels", "benchmarks", "docs", "tests", "examples", "results", "gpu", ".ci")
_PATH = re.compile(r"(?<![\w./$-])((?:%s)/[^\s`'\"()\[\]|]*)" % "|".join(re.escape(t) for t in _TOP))
_FILE = re.compile(r"(?<![\w./$-])([\w-]+\.(?:md|py|sh))\b")     # a bare file name: exists somewhere in the repo
_LINK = re.compile(r"\]\(([^)\s#]+(?:#[^)\s]*)?)\)")
_PLACEHOLDER = re.compile(r"<|>|\bX\.|NNNNN|\.\.\.|\$|\{[^,}]*\}")   # {name}: an f-string, not a brace list


def _expand(path: str):
    """``a_{x,y}.csv`` -> a_x.csv, a_y.csv (one level of braces, as the docs write them)."""
    brace = re.search(r"\{([^{}]*)\}", path)
    if not brace:
        return [path]
    return [out for alt in brace.group(1).split(",")
            for out in _expand(path[:brace.start()] + alt + path[brace.end():])]


def named_paths(doc: str):
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = set(_LINK.findall(text))
    found.update(m.split(":")[0].rstrip(".,;)") for m in _PATH.findall(text))   # PATH:box of --subject
    found.update(_FILE.findall(text))
    return sorted(p for p in found if not p.startswith(("http://", "https://", "mailto:")) and not _PLACEHOLDER.search(p))


def _anchors(path: Path) -> set:
    """GitHub's anchors of a Markdown file's headings."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)   # not code comments
    heads = re.findall(r"^#+\s+(.*)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md"] + [d for d in DOCS if d != "README.md"])
def test_every_path_a_doc_names_exists(doc):
    here = (ROOT / doc).parent
    missing = []
    for named in named_paths(doc):
        named, _, anchor = named.partition("#")
        if anchor:
            target = next((b / named for b in (here, ROOT) if (b / named).is_file()), None)
            if target is None or anchor not in _anchors(target):
                missing.append(f"{named}#{anchor}")
                continue
        for path in _expand(named):
            bases = [here, ROOT]
            if "/" not in path:
                ok = (here / path).exists() or any(p for p in ROOT.rglob(path) if ".venv" not in p.parts)
            elif "*" in path:
                ok = any(list(base.glob(path)) for base in bases)
            else:
                ok = any((base / path).exists() for base in bases)
            if not ok:
                missing.append(path)
    assert not missing, f"{doc} names paths that do not exist: {missing}"
