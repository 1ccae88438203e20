"""What the command-line tests of bad input share: a loader that must not run, a job given through
a layout file or a jobs line, and the check that it was refused in one line before loading."""
from __future__ import annotations

import json
import re


def no_loading(*args, **kwargs):
    """Patched over the model loader: the input must be refused before it runs."""
    raise AssertionError("a model was loaded before the input was checked")


def job_source(tmp_path, source: str, job: dict, first: dict):
    """``(argv, where)``: ``job`` given through ``source``, ``"--layout"`` (a layout file, written
    to ``x.png``) or ``"--jobs"`` (the second line of a jobs file after ``first``, written to
    ``out/``); ``where`` matches how an error names the file (and line)."""
    if source == "--layout":
        path = tmp_path / "layout.json"
        path.write_text(json.dumps(job))
        return ["--layout", str(path), "--out", str(tmp_path / "x.png")], r"--layout .*layout\.json.*: "
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(job) + "\n")
    return ["--jobs", str(path), "--out-dir", str(tmp_path / "out")], r"--jobs .*jobs\.jsonl:2: "


def assert_refused_in_one_line(tmp_path, argv, pattern: str, capsys) -> None:
    """``anyms generate ARGV`` on the tiny model exits 2 with one line matching ``pattern``, and
    writes neither ``x.png`` nor ``out/``."""
    from anyms import cli

    code = cli.main(["generate", *argv, "--model", "tiny", "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(pattern, err), err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()
