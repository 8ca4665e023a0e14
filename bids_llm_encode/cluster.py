"""SLURM job scripts for a whole study: ``bids_llm_encode-slurm bids_dir output_dir [options] [-- app options]``.

Writes, into ``--script-dir``:

``participants.txt``
    one ``sub-<label>`` per line: the ``--participant-label`` values, else the ``sub-*``
    folders of ``bids_dir``, else the ``participant_id`` column of its ``participants.tsv``.
``prepare.sbatch``
    the shared first step, one job: validates ``bids_dir`` once (unless
    ``--skip-bids-validation`` is among the app options), prepares the model in the
    shared cache (the GGUF de-quantized once), builds the PyBIDS index
    (``--bids-database-dir``) and, at ``--dictionary-scope model`` (the default), learns
    the model-level dictionary of the dataset's stories into the cache and writes its files
    into ``output_dir``, by running this command with ``--prepare-only``. The array's tasks
    then read the index and the dictionary instead of waiting on the dictionary's lock
    (which they would do, correctly but idly, without a prepare job: ``--no-prepare``).
``participant.sbatch``
    a job array, task *i* runs the participant level on line *i* of ``participants.txt``
    (``--participant-label sub-XX --skip-bids-validation --nprocs $SLURM_CPUS_PER_TASK``).
    Every job gets ``--bids-database-dir`` (``--bids-database-dir`` of this command, default
    ``SCRIPT_DIR/bidsdb``, unless the app options name one): the dataset is indexed once.
``group.sbatch``
    the group level.
``submit.sh``
    submits the three, chained with ``--dependency=afterok:<id>`` (the array's id covers all
    its tasks), and prints the job ids.

The app runs from a virtual environment (``--venv``: the job script activates it), from a
Singularity/Apptainer image (``--container``, with the folders bound at the same paths), or
from the ``PATH`` the job inherits. Every job shares one cache (``BIDS_LLM_ENCODE_CACHE``),
so the model and each story's atoms are computed once. Options after ``--`` go to the app at
both levels (it accepts every option at both; e.g. ``-- --group-model fixed``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import EXIT_OK, BidsAppError, MissingInputError, NoMatchError, UsageError

log = logging.getLogger("bids_llm_encode.cluster")

LABEL = re.compile(r"^[A-Za-z0-9]+$")


def find_participants(bids_dir: Path, labels: Sequence[str] = ()) -> list[str]:
    """``sub-<label>`` for each participant: given labels, else ``sub-*`` folders, else participants.tsv."""
    if len(labels) == 1 and Path(labels[0]).is_file():
        labels = [ln.split("#")[0].strip() for ln in Path(labels[0]).read_text().splitlines()]
    found = [lab for part in labels for lab in re.split(r"[,\s]+", part) if lab]
    if not found:
        found = sorted(p.name for p in Path(bids_dir).glob("sub-*") if p.is_dir())
    if not found and (Path(bids_dir) / "participants.tsv").is_file():
        with open(Path(bids_dir) / "participants.tsv", newline="") as fh:
            found = [row["participant_id"] for row in csv.DictReader(fh, delimiter="\t") if row.get("participant_id")]
    out = []
    for lab in found:
        lab = lab[4:] if lab.startswith("sub-") else lab
        if not LABEL.match(lab):
            raise UsageError(f"participant label {lab!r} is not alphanumeric (BIDS labels are)")
        if f"sub-{lab}" not in out:
            out.append(f"sub-{lab}")
    if not out:
        raise NoMatchError(f"no participants: no --participant-label, no sub-* folder in {bids_dir} "
                                  "and no participants.tsv with a participant_id column")
    return out


def _q(x) -> str:
    return shlex.quote(str(x))


def _header(name: str, log_dir: Path, args, array: Optional[str] = None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --cpus-per-task={args.cpus_per_task}"]
    if array:
        lines.append(f"#SBATCH --array={array}")
        lines.append(f"#SBATCH --output={log_dir}/%x_%A_%a.out")
    else:
        lines.append(f"#SBATCH --output={log_dir}/%x_%j.out")
    if args.mem_mb:
        lines.append(f"#SBATCH --mem={args.mem_mb}M")
    if args.time:
        lines.append(f"#SBATCH --time={args.time}")
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    if args.gpu:
        lines.append("#SBATCH --gres=gpu:1")
    lines += [f"#SBATCH {extra}" for extra in args.sbatch_arg]
    return lines + ["set -euo pipefail"]


def _environment(args, cache: Path, database: Optional[Path] = None) -> list[str]:
    """Lines that make the app runnable in a job; `"${APP[@]}"` is then the app (or --prepare-only)."""
    # the folders must exist before singularity can bind them
    folders = " ".join(_q(f) for f in (args.output_dir, cache, *([database] if database else [])))
    lines = [f"mkdir -p {folders}", f"export BIDS_LLM_ENCODE_CACHE={_q(cache)}"]
    if args.container:
        cmd = args.container_cmd
        binds = [f"-B {_q(str(args.bids_dir) + ':' + str(args.bids_dir) + ':ro')}", f"-B {_q(args.output_dir)}",
                 f"-B {_q(cache)}", *([f"-B {_q(database)}"] if database else [])]
        nv = " --nv" if args.gpu else ""
        lines += [
            "# --cleanenv keeps the host's environment out; the cache is passed in explicitly",
            f"export SINGULARITYENV_BIDS_LLM_ENCODE_CACHE={_q(cache)} APPTAINERENV_BIDS_LLM_ENCODE_CACHE={_q(cache)}",
            f"APP=({cmd} run --cleanenv{nv} {' '.join(binds)} {_q(args.container)})",
            f"PREPARE=({cmd} exec --cleanenv {' '.join(binds)} {_q(args.container)} python -m bids_llm_encode.cluster)",
        ]
    else:
        if args.venv:
            lines.append(f"source {_q(Path(args.venv) / 'bin' / 'activate')}")
        lines += ["APP=(bids_llm_encode)", "PREPARE=(python -m bids_llm_encode.cluster)"]
    return lines


def write_scripts(args) -> dict:
    """Write the scripts for parsed ``args``; returns ``{"participants": [...], <name>: Path, ...}``."""
    script_dir = Path(args.script_dir).absolute()
    log_dir = script_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir or os.environ.get("BIDS_LLM_ENCODE_CACHE") or script_dir / "cache").absolute()
    participants = find_participants(args.bids_dir, args.participant_label)
    plist = script_dir / "participants.txt"
    plist.write_text("".join(p + "\n" for p in participants))

    app_args = list(args.app_args)
    validate_once = args.prepare and "--skip-bids-validation" not in app_args and "--skip_bids_validation" not in app_args
    database = None  # one PyBIDS index for every job (unless the app options name their own)
    if not any(a.split("=")[0] in ("--bids-database-dir", "--bids_database_dir") for a in app_args):
        database = Path(args.bids_database_dir or script_dir / "bidsdb").absolute()
        app_args = ["--bids-database-dir", str(database), *app_args]
    extra = " ".join(_q(a) for a in app_args)
    res = ['--nprocs "${SLURM_CPUS_PER_TASK:-1}"'] + ([f"--mem-mb {int(args.mem_mb)}"] if args.mem_mb else [])
    env = _environment(args, cache, database)
    b, o = _q(args.bids_dir), _q(args.output_dir)

    n = len(participants)
    array = f"1-{n}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    part = _header(f"{args.job_name}-participant", log_dir, args, array) + env + [
        f"label=$(sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {_q(plist)})",
        '[ -n "$label" ] || { echo "no participant on line $SLURM_ARRAY_TASK_ID" >&2; exit 64; }',
        'echo "participant $label (task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID:-?}) on $(hostname)"',
        f'"${{APP[@]}}" {b} {o} participant --participant-label "$label"'
        + (" --skip-bids-validation" if validate_once else "") + f" {' '.join(res)} {extra}".rstrip(),
    ]
    group = _header(f"{args.job_name}-group", log_dir, args) + env + [
        f'"${{APP[@]}}" {b} {o} group {" ".join(res)} {extra}'.rstrip(),
    ]
    prep = _header(f"{args.job_name}-prepare", log_dir, args) + env + [
        f'"${{PREPARE[@]}}" --prepare-only {b} {o}' + ("" if validate_once else " --no-validate")
        + f" -- {' '.join(res)} {extra}".rstrip(),
    ]
    paths = {"participants": participants, "participants_file": plist}
    for name, lines in (("prepare", prep), ("participant", part), ("group", group)):
        if name == "prepare" and not args.prepare:
            continue
        path = script_dir / f"{name}.sbatch"
        path.write_text("\n".join(lines) + "\n")
        paths[name] = path

    sub = ["#!/bin/bash",
           "# Submits the jobs, each waiting for the previous one to succeed; prints their ids.",
           "set -euo pipefail",
           'cd "$(dirname "$0")"',
           'jid() { local out; out=$(sbatch --parsable "$@"); echo "${out%%;*}"; }']
    dep = ""
    if args.prepare:
        sub += ["prepare=$(jid prepare.sbatch)", 'echo "prepare job:           $prepare"']
        dep = "--kill-on-invalid-dep=yes --dependency=afterok:$prepare "
    sub += [f"participant=$(jid {dep}participant.sbatch)",
            f'echo "participant array job: $participant ({n} tasks: {" ".join(participants)})"',
            "group=$(jid --kill-on-invalid-dep=yes --dependency=afterok:$participant group.sbatch)",
            'echo "group job:             $group"',
            'echo "${prepare:-} $participant $group" > last_submitted.txt']
    path = script_dir / "submit.sh"
    path.write_text("\n".join(sub) + "\n")
    for p in script_dir.glob("*.sbatch"):
        p.chmod(0o755)
    path.chmod(0o755)
    paths["submit"] = path
    return paths


def prepare(bids_dir: Path, output_dir: Path, app_args: Sequence[str], validate: bool = True) -> None:
    """The shared first step: validate ``bids_dir`` once, prepare the model in the cache, build the
    PyBIDS index, and at ``--dictionary-scope model`` learn the model-level dictionary."""
    from .cache import cache_root
    from .cli import parse_config, set_resources
    from .lm.models import load_model

    cfg = parse_config([str(bids_dir), str(output_dir), "participant", *app_args]).validate()
    set_resources(cfg.nprocs, cfg.mem_mb)
    if validate:
        from .bids.validate import validate_dataset

        validate_dataset(cfg.bids_dir)
        log.info("%s passes BIDS validation", cfg.bids_dir)
    root = cache_root(cfg)
    load_model(cfg.model, device="cpu", dtype=cfg.dtype, cache_dir=root)
    log.info("model %s ready in the cache %s", cfg.model, root)
    if cfg.dictionary_scope == "model":  # also indexes the dataset (--bids-database-dir)
        from .workflows.participant import prepare_dictionary

        shared = prepare_dictionary(cfg)
        log.info("model-level dictionary of %d stories ready in the cache and %s", len(shared.stories),
                 cfg.output_dir)
    else:
        from .bids.inputs import index_dataset

        index_dataset(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bids_llm_encode-slurm",
        description="Write SLURM scripts for bids_llm_encode: a prepare job, a participant-level job array "
                    "(one task per participant) and a dependent group-level job, plus submit.sh that chains them.",
        epilog="Options after -- are passed to bids_llm_encode at both levels. Documentation: docs/cluster.md.")
    p.add_argument("bids_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=[],
                   help="labels (sub- optional) or a file of labels; default: the sub-* folders, else participants.tsv")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--venv", type=Path, help="virtual environment the jobs activate (e.g. the project's .venv)")
    how.add_argument("--container", type=Path, help="Singularity/Apptainer image (.sif) the jobs run")
    p.add_argument("--container-cmd", default="singularity", help="singularity (default) or apptainer")
    p.add_argument("--gpu", action="store_true", help="ask for one GPU per job (--gres=gpu:1) and pass --nv")
    p.add_argument("--cache-dir", type=Path,
                   help="cache shared by all jobs (default $BIDS_LLM_ENCODE_CACHE, else SCRIPT_DIR/cache)")
    p.add_argument("--script-dir", type=Path, default=Path("slurm"), help="where the scripts go (default ./slurm)")
    p.add_argument("--bids-database-dir", type=Path,
                   help="the PyBIDS index every job shares (the app's --bids-database-dir; default "
                        "SCRIPT_DIR/bidsdb; an app option after -- wins)")
    p.add_argument("--job-name", default="llm_encode")
    p.add_argument("--cpus-per-task", type=int, default=4, help="also the app's --nprocs (default 4)")
    p.add_argument("--mem-mb", type=int, help="#SBATCH --mem, and the app's --mem-mb")
    p.add_argument("--time", help="#SBATCH --time, e.g. 04:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--max-parallel", type=int, help="array tasks at once (--array=1-N%%M)")
    p.add_argument("--sbatch-arg", action="append", default=[],
                   help="another #SBATCH line for every job, e.g. --sbatch-arg=--qos=low (repeatable)")
    p.add_argument("--no-prepare", dest="prepare", action="store_false",
                   help="no prepare job: each task validates and prepares the model itself")
    p.add_argument("--submit", action="store_true", help="run submit.sh right away")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)  # what prepare.sbatch runs
    p.add_argument("--no-validate", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, app_args = argv[:i], argv[i + 1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    args.app_args = app_args
    args.bids_dir, args.output_dir = args.bids_dir.absolute(), args.output_dir.absolute()
    try:
        if args.prepare_only:
            prepare(args.bids_dir, args.output_dir, app_args, validate=not args.no_validate)
            return EXIT_OK
        if not args.bids_dir.is_dir():
            raise MissingInputError(f"bids_dir {args.bids_dir} is not a folder")
        if args.container and not args.container.exists():
            log.warning("container %s does not exist (yet)", args.container)
        if args.container:
            args.container = args.container.absolute()
        if args.venv:
            args.venv = args.venv.absolute()
        paths = write_scripts(args)
    except BidsAppError as exc:
        print(f"bids_llm_encode-slurm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{len(paths['participants'])} participants; scripts in {paths['submit'].parent}:")
    for name in ("prepare", "participant", "group", "submit"):
        if name in paths:
            print(f"  {paths[name]}")
    if args.submit:
        import subprocess

        return subprocess.call(["bash", str(paths["submit"])])
    print(f"submit with: bash {paths['submit']}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
