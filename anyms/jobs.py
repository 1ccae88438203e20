"""``anyms generate --jobs JOBS.jsonl``: many layouts in one run, resumable, across processes.

    anyms generate --jobs jobs.jsonl --out-dir out/                     # one process
    accelerate launch --multi_gpu --num_processes 8 -m anyms generate --jobs jobs.jsonl --out-dir out/

One JSON object a line (the schema: ``anyms.job.JOBS_SCHEMA``, also in ``anyms generate
--help``). The run, in order:

1. reads and checks every job (its images and masks too) before any model loads: a bad
   line is one error naming ``--jobs FILE:LINE`` and the key, and nothing is made;
2. takes the output folder's lock (anyms.lock; one run writes in a folder at a time, the
   processes of one launch being one run; another run holding it is one error naming it,
   exit 2) and removes the temporary files a stopped run left beside this run's files;
   then sorts the jobs into done (its image exists and its PNG record is this very job: same
   prompt, layout, files, seed, steps, size, model...), pending, and conflicting (an image
   made from something else: refused unless ``--overwrite``);
3. loads the model once per process; under ``accelerate launch`` (or torchrun) each of the
   N processes takes the pending jobs ``rank, rank + N, ...``, on its own device. Seeds
   come from the jobs (``"seed"``, else ``--seed`` + the job's index), never from the rank,
   so an image is the same whatever the number of processes;
4. makes its jobs with a progress bar (images, seconds per image), reusing each distinct
   subject image's embedding (:class:`anyms.embeddings.SubjectEmbeddingCache`), writing
   each image atomically (a PNG with its record) as soon as it is made, and one line per
   job to its own ``.manifest.rank-R.jsonl`` (rewritten by each run); a failed job (out of memory, ...) is recorded
   and the run goes on;
5. when every process is done, the first writes ``manifest.jsonl`` (one line per job, in
   file order: ``index, line, out, status, seed, seconds, process, error``; ``status``:
   ``done``, ``skipped`` (done before), ``failed``) and removes the per-process files.

Exit status: 0, or 1 if a job failed (the manifest says which), 2 for bad input.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import console
from .console import emit, one_line
from .errors import GenerationError, UsageError
from .job import (
    DEFAULT_STEPS, JOB_KEYS, Job, apply_run_defaults, check_blocks_on_model, check_job, check_outputs,
    check_prompts_on_model, generate_image, image_record, layout_from_dict, memory_report, merge_upscale, parse_blocks,
    save_job, upscale_from_args,
    upscale_geometry_before_loading, warn_unreached,
)
from .budget import plan_memory
from .loading import default_size, load_for_run, run_from_args, threads_for
from .lock import FolderBusy, FolderLock, launch_name
from .outputs import TEMPORARY_EXTRA

__all__ = ["read_jobs", "run_jobs", "MANIFEST"]

MANIFEST = "manifest.jsonl"


@dataclass
class Processes:
    """This process's place in a distributed launch (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: Optional[str] = None                # the device the launcher gives this process
    cpu: bool = True
    state: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def connect(self) -> None:
        """Join the other processes (accelerate's PartialState: gloo on CPUs, NCCL on GPUs).
        Called after the model is loaded: transformers saves files on rank 0 only once
        torch.distributed is up, which would starve the other processes' tiny models."""
        if self.world > 1 and self.state is None:
            from accelerate import PartialState

            self.state = PartialState(cpu=self.cpu)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# Where a launcher says how many processes there are and which one this is: torchrun (and
# accelerate launch --multi_gpu, which runs it), then MPI (accelerate launch --cpu under mpirun).
WORLD_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(names, default: int) -> int:
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return default


def process_rank() -> int:
    """This process's rank in a distributed launch (0 alone)."""
    return _first_int(RANK_VARIABLES, 0)


def processes(device_option: str) -> Processes:
    """Where this process stands in a launch with several processes (accelerate launch,
    torchrun: ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``; or mpirun's), else one process."""
    world = _first_int(WORLD_VARIABLES, 1)
    if world <= 1:
        _refuse_a_launch_of_one(device_option)
        return Processes()
    import torch

    cpu = device_option == "cpu" or (device_option == "auto" and not torch.cuda.is_available()) \
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # each process on its own GPU (LOCAL_RANK), unless the command names one (cuda:1)
    local = _first_int(LOCAL_RANK_VARIABLES, 0)
    device = "cpu" if cpu else (f"cuda:{local}" if device_option in ("auto", "cuda") else None)
    return Processes(process_rank(), world, device, cpu)


def _refuse_a_launch_of_one(device_option: str) -> None:
    """``accelerate launch --num_processes N`` with ``--cpu`` (or on a machine without GPUs, without
    ``--multi_gpu``) starts ONE process, outside mpirun, with the rendezvous address of N set
    (``MASTER_ADDR``) but no ``WORLD_SIZE``: that process alone would make every job. Refused."""
    if "ACCELERATE_USE_CPU" not in os.environ or not os.environ.get("MASTER_ADDR"):
        return
    device = "" if device_option == "auto" else f" --device {device_option}"
    raise UsageError(
        "--jobs: `accelerate launch` started this one process although more were asked for (with --cpu, or "
        "without --multi_gpu, it starts several only under mpirun), so one process would make every job; on "
        "CPUs run `accelerate launch --multi_gpu --num_processes N -m anyms generate --jobs ... --device cpu` or "
        f"`torchrun --nproc-per-node N -m anyms generate --jobs ...{device}`, or leave --num_processes out for "
        "one process")


def read_jobs(path: str, args) -> Tuple[List[Job], str]:
    """The jobs of ``path`` (checked for form, not yet for content) and the output folder."""
    what = f"--jobs {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: cannot read it ({e})") from None
    folder = os.path.dirname(os.path.abspath(path))
    out_dir = args.out_dir or f"{os.path.splitext(path)[0]}-out"
    jobs: List[Job] = []
    outs: Dict[str, int] = {}
    for line_no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"--jobs {path}:{line_no}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        except (ValueError, RecursionError) as e:   # an integer of 5000 digits, arrays nested 100000 deep
            raise UsageError(f"{where}: not valid JSON ({e})") from None
        layout = layout_from_dict(data, where, folder, extra_keys=JOB_KEYS)
        index = len(jobs)
        out = layout.get("out", f"{index:05d}.png")
        if not isinstance(out, str) or not out.lower().endswith(".png"):
            raise UsageError(f"{where}: \"out\" must be a .png path (its record makes the run resumable), got {out!r}")
        out = _inside(out_dir, out, f'{where} "out"')
        # every file the job writes, pictures included, is its own: no job replaces another's
        for written in _paths_of(out):
            key = os.path.normcase(written)
            if key in outs and written == out:
                raise UsageError(f"{where}: \"out\" {layout.get('out', out)!r} is also line {outs[key]}'s: every "
                                 f"job needs an image of its own")
            if key in outs:
                raise UsageError(f"{where}: \"out\" {layout.get('out', out)!r} would write "
                                 f"{_relative(written, out_dir)!r}, which line {outs[key]}'s job writes too: every "
                                 f"job needs files of its own")
            outs[key] = line_no
        seed = layout.get("seed", (args.seed or 0) + index)
        # the line's "upscale" keys over the --upscale options; "upscale": null, none
        upscale = None if "upscale" in layout and layout["upscale"] is None else \
            merge_upscale(upscale_from_args(args), layout.get("upscale"), where)

        def pick(key, option, default=None):
            if key in layout:
                return layout[key]
            value = getattr(args, option)
            return default if value is None else value

        jobs.append(Job(
            prompt=layout["prompt"] if layout["prompt"] is not None else args.prompt,
            subjects=layout["subjects"], mode=layout["mode"] or args.mode or "overwrite",
            blocks=layout["blocks"] if layout.get("blocks") is not None else _blocks_option(args),
            priority=layout["priority"] or args.priority or "order", seed=seed,
            steps=pick("steps", "steps", DEFAULT_STEPS), guidance=pick("guidance", "guidance"),
            height=pick("height", "height"), width=pick("width", "width"),
            negative_prompt=pick("negative_prompt", "negative_prompt"), out=out, where=where, index=index,
            upscale=upscale and upscale[0], upscale_names=upscale and upscale[1]))
    if not jobs:
        raise UsageError(f"{what} holds no jobs (one JSON object a line)")
    return jobs, out_dir


def _blocks_option(args):
    """``--blocks`` (parsed), the default of the jobs without their own \"blocks\"."""
    return None if getattr(args, "blocks", None) is None else parse_blocks(args.blocks)


def _expected(job: Job, run) -> dict:
    """What the record of ``job``'s image must hold for the job to count as done."""
    record = image_record(None, job, run)
    for key in ("anyms_version", "versions", "device"):
        record.pop(key, None)
    return record


def _default_guidance(pipe) -> Optional[float]:
    """The guidance the pipeline uses when none is given: its ``__call__``'s default."""
    import inspect

    try:
        default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    except (KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else float(default)


def _unlike(job: Job, run, pipe) -> Optional[str]:
    """Why the image of a job found done before loading was made from something else, now that the
    model's defaults are known (an unset size or guidance is the model's default, never "anything")."""
    from .metadata import read_record

    record = read_record(job.out, "image")
    height, width = default_size(pipe)
    want = {"height": job.height or height, "width": job.width or width,
            "guidance": job.guidance if job.guidance is not None else _default_guidance(pipe)}
    diff = [key for key, value in want.items() if value is not None and record.get(key) != value]
    if job.upscale is not None:         # an unset tile or overlap: the model's default
        from .job import check_upscale
        from .upscale_args import geometry_of_pipe

        if record.get("upscale") != check_upscale(job, geometry_of_pipe(pipe)):
            diff.append("upscale")
    if not diff:
        return None
    return (f"{job.out!r} exists but was made from something else ({', '.join(diff)} "
            f"differ{'s' if len(diff) == 1 else ''})")


def sort_jobs(jobs: List[Job], run) -> Tuple[List[Job], List[Job], List[Tuple[Job, str]]]:
    """``(done, pending, conflicts)``: conflicts are images that exist but record something else.
    Before the model loads, an unset size or guidance is not known yet (see :func:`_unlike`)."""
    from .metadata import differences, read_record

    done, pending, conflicts = [], [], []
    for job in jobs:
        if not os.path.lexists(job.out):
            pending.append(job)
            continue
        try:
            record = read_record(job.out, "image")
        except ValueError as e:
            conflicts.append((job, str(e)))
            continue
        diff = differences(record, _expected(job, run))
        if record.get("negative_prompt") != job.negative_prompt and "negative_prompt" not in diff:
            diff.append("negative_prompt")      # unset means none, not "any"
        if ("upscale" in record) != (job.upscale is not None) and "upscale" not in diff:
            diff.append("upscale")              # upscaled or not is part of what made it
        if diff:
            conflicts.append((job, f"{job.out!r} exists but was made from something else ({', '.join(diff[:4])} "
                                   f"differ{'s' if len(diff) == 1 else ''})"))
        else:
            done.append(job)
    return done, pending, conflicts


def _paths_of(out: str) -> Tuple[str, str, str]:
    """The image ``out`` and its two pictures: every file a job may write."""
    stem = os.path.splitext(out)[0]
    return out, f"{stem}.layout.png", f"{stem}.routing.png"


def _paths(job: Job, pictures: bool):
    return _paths_of(job.out) if pictures else (job.out, None, None)




def _inside(out_dir: str, out: str, what: str) -> str:
    """``out``, a job's relative output path, as an absolute path that resolves inside ``out_dir``
    (through any link on the way); a UsageError naming ``what`` otherwise."""
    if "\0" in out:
        raise UsageError(f"{what} holds a NUL character")
    if os.path.isabs(out):
        raise UsageError(f"{what} {out!r} is an absolute path: give a path relative to --out-dir")
    path = os.path.abspath(os.path.join(out_dir, out))
    root = os.path.realpath(out_dir)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise UsageError(f"{what} {out!r} resolves to {resolved!r}, outside --out-dir {out_dir!r}: every "
                         f"output stays inside the output folder")
    if os.path.basename(path).lower() == ".png":
        raise UsageError(f"{what} {out!r} has an empty file name before .png")
    try:
        name_max = os.pathconf(root, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max(len(os.path.basename(p).encode("utf-8")) for p in _paths_of(path)) + TEMPORARY_EXTRA
    if longest > name_max:
        raise UsageError(f"{what} {out!r}: its file name is too long for the file system (a file of this job "
                         f"would need a {longest}-byte name, at most {name_max})")
    return path


def _relative(path: str, folder: str) -> str:
    try:
        return os.path.relpath(path, folder).replace(os.sep, "/")
    except ValueError:
        return path


def _read_lines(path: str) -> List[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):
                    continue            # a line cut short by a crash, or not one of ours
                if isinstance(entry, dict):
                    out.append(entry)
    except OSError:
        pass
    return out


def run_jobs(args) -> int:
    if args.out is not None:
        raise UsageError("--out names one image; with --jobs each job's \"out\" is relative to --out-dir")
    procs = processes(args.device)
    # 1. Every job, checked before any model loads.
    jobs, out_dir = read_jobs(args.jobs, args)
    run = run_from_args(args, device=procs.device)
    geometry = upscale_geometry_before_loading(run)
    for job in jobs:
        check_job(apply_run_defaults(job, run), run.arch, geometry, num_adapters=run.num_adapters)
        job.plan = None                          # re-read when it runs: thousands of jobs' images stay on disk
    check_outputs([os.path.join(out_dir, MANIFEST)], overwrite=True, what="--out-dir")
    log = _info_main(procs)
    if args.max_memory is not None:             # one plan, for the run's largest image, before any load
        run = plan_memory(args, run, jobs, log=log)
    # One writer per folder (the processes of one launch are one): held until the run ends.
    lock = FolderLock(out_dir, launch_name(procs.world), shared=procs.world > 1,
                      prepare=lambda: _remove_temporaries(jobs, out_dir))
    try:
        lock.acquire()
    except FolderBusy as e:
        raise UsageError(f"--out-dir: {e}") from None
    if lock.taken_over:
        gone = lock.taken_over
        log(f"took over the folder's lock from a run that stopped (PID {gone.get('pid')} on {gone.get('host')})")
    try:
        return _run_holding_the_lock(args, procs, jobs, out_dir, run, log)
    finally:
        # the first process lets the others go first, and removes the lock file
        lock.release(wait=5.0 if procs.main else 0.0)


def _remove_temporaries(jobs: List[Job], out_dir: str) -> None:
    """The temporary files a stopped run left beside this run's files (only while no other process writes)."""
    from .outputs import remove_stale_temporaries

    removed = remove_stale_temporaries([p for job in jobs for p in _paths_of(job.out)]
                                       + [os.path.join(out_dir, MANIFEST)])
    if removed:
        console.info(f"removed {len(removed)} temporary file{'s' * (len(removed) != 1)} a stopped run left "
                     f"(.NAME.XXXXXXXX.tmp)")


def _run_holding_the_lock(args, procs: Processes, jobs: List[Job], out_dir: str, run, log) -> int:
    from .embeddings import SubjectEmbeddingCache
    from .outputs import WriteError, atomic_write_text

    # 2. Done, pending, conflicting.
    done, pending, conflicts = sort_jobs(jobs, run)
    if conflicts and not run.overwrite:
        job, why = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UsageError(f"{job.where}: {why}{more}; give --overwrite to make them again, or another \"out\"")
    pending = sorted(pending + [job for job, _ in conflicts], key=lambda j: j.index)
    folders = {}
    for job in pending:                         # every folder made and writable, once each
        folders.setdefault(os.path.dirname(os.path.abspath(job.out)), job)
    for job in folders.values():
        check_outputs([job.out], overwrite=True, what=job.where + ": \"out\"")

    # 3. The model, once per process; then every process starts together (all have sorted the jobs).
    with threads_for(run):
        pipe = load_for_run(args, run, log=log)
        for job in jobs:                        # block names and prompt lengths against the model, before any image
            check_blocks_on_model(pipe, job)
            check_prompts_on_model(pipe, job)
        # the jobs that looked done, checked again against the model's defaults
        late = [(job, why) for job in done for why in [_unlike(job, run, pipe)] if why]
        if late and not run.overwrite:
            job, why = late[0]
            more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
            raise UsageError(f"{job.where}: {why}{more}; give --overwrite to make them again, or another \"out\"")
        if late:
            done = [job for job in done if all(job is not other for other, _ in late)]
            pending = sorted(pending + [job for job, _ in late], key=lambda j: j.index)
        mine = pending[procs.rank::procs.world]
        procs.connect()
        if procs.main and pending:
            memory_report(pipe, run, pending, log=log)
        procs.barrier()
        log(f"jobs: {len(jobs)} in {args.jobs}; {len(done)} done before, {len(pending)} to make"
            + (f", split across {procs.world} processes (this one makes {len(mine)})"
               if procs.world > 1 else ""))
        pipe.set_progress_bar_config(disable=True)
        cache = SubjectEmbeddingCache()
        rank_file = os.path.join(out_dir, f".manifest.rank-{procs.rank}.jsonl")
        results = _make(pipe, mine, run, cache, rank_file, procs, out_dir)

    # 4. The manifest, once every process is done.
    procs.barrier()
    failed = sum(r["status"] == "failed" for r in results)
    log(f"process {procs.rank}: made {len(results) - failed} image{'s' * (len(results) - failed != 1)}"
        + (f", {failed} failed" if failed else "")
        + f"; subject embeddings: {cache.misses} encoded, {cache.hits} reused")
    if procs.main:
        entries = _manifest(jobs, done, out_dir, procs.world, own=results)
        try:
            atomic_write_text(os.path.join(out_dir, MANIFEST), "".join(json.dumps(e) + "\n" for e in entries))
        except WriteError as e:         # a full disk: the per-process lines stay, the images are complete
            manifest_error = f"the manifest is not written ({e})"
        else:
            manifest_error = None
            for path in glob.glob(os.path.join(glob.escape(out_dir), ".manifest.rank-*.jsonl")):
                os.unlink(path)         # this run's, and any a stopped run left
        counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "skipped", "failed", "pending")}
        times = [e["seconds"] for e in entries if e["status"] == "done" and e.get("seconds") is not None]
        per = f", {sum(times) / len(times):.2f} s per image" if times else ""
        print(f"jobs: {counts['done']} made, {counts['skipped']} done before, {counts['failed']} failed"
              + (f", {counts['pending']} not made" if counts["pending"] else "") + per)
        if manifest_error is None:
            print(f"manifest: {os.path.abspath(os.path.join(out_dir, MANIFEST))}")
        if counts["failed"]:
            first = next(e for e in entries if e["status"] == "failed")
            console.warn(f"{counts['failed']} job{'s' * (counts['failed'] != 1)} failed; the first, line "
                         f"{first['line']}: {first['error']}")
        if manifest_error is not None:
            raise GenerationError(f"{manifest_error}; every image written is complete")
        return 1 if counts["failed"] or counts["pending"] else 0
    return 1 if failed else 0


def _info_main(procs: Processes):
    def log(message: str) -> None:
        if procs.main:
            emit(message) if _bar_running[0] else print(message, flush=True)
    return log


_bar_running = [False]


def _make(pipe, jobs: List[Job], run, cache, rank_file: str, procs: Processes, out_dir: str) -> List[dict]:
    """Make ``jobs`` one by one; a line per job in ``rank_file`` as it finishes; returns those lines."""
    from tqdm.auto import tqdm

    results = []
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=len(jobs), desc="jobs", unit="image", disable=not procs.main or not jobs, file=sys.stderr,
               dynamic_ncols=True)
    _bar_running[0] = not bar.disable

    def warn(message: str) -> None:
        console.warn(message)

    try:
        with _ProcessLines(rank_file) as manifest, cache.attached(pipe):
            for job in jobs:
                t0 = time.perf_counter()
                entry = {"index": job.index, "line": int(job.where.rsplit(":", 1)[1]), "out": _relative(job.out, out_dir),
                         "seed": job.seed, "process": procs.rank}
                try:
                    check_job(job, run.arch, num_adapters=run.num_adapters)
                    warn_unreached(pipe, job, warn=warn)
                    image = generate_image(pipe, job, run)
                    # pictures first, the image last: an image on disk means its job is complete
                    # (a pending job's pictures are left over from a stopped run: replaced)
                    save_job(pipe, image, job, run, _paths(job, run.pictures), warn=warn, overwrite_pictures=True)
                    entry.update(status="done", seconds=round(time.perf_counter() - t0, 3))
                except (UsageError, GenerationError) as e:
                    entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3), error=one_line(e))
                except Exception as e:      # one job's failure does not stop a run of thousands
                    entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3),
                                 error=one_line(f"{type(e).__name__}: {e}"))
                finally:
                    job.plan = None
                results.append(entry)
                manifest.add(entry)
                bar.update(1)
                bar.set_postfix_str(f"last {entry['seconds']:.2f} s" + (", FAILED" if entry["status"] == "failed"
                                                                        else ""))
    finally:
        bar.close()
        _bar_running[0] = False
    return results


def _open_new(path: str):
    """``path`` opened for writing as a new file: whatever had that name (a link planted there
    included) is removed first, never followed or truncated."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, "w", encoding="utf-8")


class _ProcessLines:
    """This process's manifest lines (``.manifest.rank-R.jsonl``), one per job as it finishes, so a
    stopped run leaves what it did. A line that cannot be written (a full disk) is warned about
    once and the run goes on: the process keeps its lines in memory too."""

    def __init__(self, path: str):
        self.path, self.file = path, None
        try:
            self.file = _open_new(path)
        except OSError as e:
            self._lost(e)

    def add(self, entry: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        except OSError as e:
            self._lost(e)

    def _lost(self, error: OSError) -> None:
        console.warn(f"cannot write {self.path!r} ({error.strerror or error}): this process's manifest lines are "
                     f"kept in memory only")
        self.close()

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:             # the unwritten end of a line: nothing to keep
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _manifest(jobs: List[Job], done_before: List[Job], out_dir: str, world: int,
              own: Optional[List[dict]] = None) -> List[dict]:
    """One entry per job, in file order, from the processes' lines (and ``own``, this process's
    lines as it kept them) and the previous manifest."""
    now: Dict[int, dict] = {}
    for r in range(world):
        for entry in _read_lines(os.path.join(out_dir, f".manifest.rank-{r}.jsonl")):
            now[entry.get("index")] = entry
    for entry in own or ():
        now[entry.get("index")] = entry
    before = {e.get("out"): e for e in _read_lines(os.path.join(out_dir, MANIFEST))}
    done_before_ids = {job.index for job in done_before}
    entries = []
    for job in jobs:
        out = _relative(job.out, out_dir)
        line = int(job.where.rsplit(":", 1)[1])
        if job.index in done_before_ids:
            old = before.get(out, {})
            entry = {"index": job.index, "line": line, "out": out, "seed": job.seed, "status": "skipped",
                     "seconds": old.get("seconds"), "process": old.get("process")}
        elif job.index in now:
            entry = dict(now[job.index])
        else:
            entry = {"index": job.index, "line": line, "out": out, "seed": job.seed, "status": "pending"}
        entries.append(entry)
    return entries
