"""Command line: options, config file, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_llm_encode import __version__
from bids_llm_encode.cli import parse_config, run
from bids_llm_encode.errors import EXIT_UNKNOWN_LEVEL, EXIT_USAGE, UnknownLevelError, UsageError


def test_defaults_and_both_spellings(tmp_path):
    cfg = parse_config([str(tmp_path), str(tmp_path / "out"), "participant",
                        "--participant_label", "sub-01", "02", "--session-label", "1",
                        "-t", "pieman", "--skip_bids_validation", "--nthreads", "3", "-vv"])
    assert cfg.participant_label == ["sub-01", "02"]
    assert cfg.session_label == ["1"]
    assert cfg.task_label == ["pieman"]
    assert cfg.skip_bids_validation is True
    assert cfg.nprocs == 3
    assert cfg.verbose == 2
    assert cfg.space == "MNI152NLin2009cAsym"
    assert cfg.model == "smollm2-135m"
    assert cfg.output_dir.is_absolute()


def test_task_id_alias_and_hyphen_spelling(tmp_path):
    cfg = parse_config([str(tmp_path), str(tmp_path), "participant", "--task-id", "a", "b",
                        "--participant-label", "01"])
    assert cfg.task_label == ["a", "b"] and cfg.participant_label == ["01"]


def test_config_file_then_command_line_wins(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"n-atoms": 12, "model": "minilm-l6", "fbn_atlas": ["Yeo7"]}))
    cfg = parse_config([str(tmp_path), str(tmp_path), "participant", "--config-file", str(f),
                        "--n-atoms", "8"])
    assert cfg.n_atoms == 8 and cfg.model == "minilm-l6" and cfg.fbn_atlas == ["Yeo7"]


def test_config_file_unknown_option(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"n_atom": 12}))
    with pytest.raises(UsageError, match="n_atom"):
        parse_config([str(tmp_path), str(tmp_path), "participant", "--config-file", str(f)])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config([str(tmp_path), str(tmp_path / "o"), "group", "--n-atoms", "5"])
    resolved = cfg.resolved()
    assert resolved["bids_llm_encode"] == __version__ and resolved["software"]["numpy"]
    f = tmp_path / "resolved.json"
    f.write_text(json.dumps(resolved))
    again = parse_config([str(tmp_path), str(tmp_path / "o"), "group", "--config-file", str(f)])
    assert again.n_atoms == 5


def test_unknown_level_exit_code(tmp_path, capsys):
    with pytest.raises(UnknownLevelError):
        parse_config([str(tmp_path), str(tmp_path), "subject"])
    assert run([str(tmp_path), str(tmp_path), "subject"]) == EXIT_UNKNOWN_LEVEL
    assert "unknown analysis level 'subject'" in capsys.readouterr().err


def test_usage_error_exit_code(tmp_path, capsys):
    assert run([str(tmp_path)]) == EXIT_USAGE
    assert run([str(tmp_path), str(tmp_path), "participant", "--n-atoms", "many"]) == EXIT_USAGE
    assert "invalid int value" in capsys.readouterr().err


def test_console_script_version():
    exe = Path(sys.executable).with_name("bids_llm_encode")
    if not exe.exists():
        pytest.skip("package not installed as a console script")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_verbose_from_config_file_is_kept(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"verbose": 2}))
    cfg = parse_config([str(tmp_path), str(tmp_path), "participant", "--config-file", str(f)])
    assert cfg.verbose == 2
    assert parse_config([str(tmp_path), str(tmp_path), "participant", "-v"]).verbose == 1


def test_demo_command_usage_error_is_64(tmp_path, capsys):
    from bids_llm_encode.demo.cli import main as demo_main

    assert demo_main([str(tmp_path / "d"), "--participants", "many"]) == EXIT_USAGE
    assert "invalid int value" in capsys.readouterr().err


def test_nprocs_raises_blas_threads_pinned_by_the_environment():
    # An image or a job that exports OPENBLAS_NUM_THREADS=1 etc.: --nprocs still sets numpy's,
    # scipy's and torch's pools (threadpoolctl), and says so in the log.
    code = ("import logging, json; logging.basicConfig(level=logging.INFO)\n"
            "from bids_llm_encode.cli import set_resources\n"
            "print(json.dumps(set_resources(3, 4000)))\n"
            "from threadpoolctl import threadpool_info\n"
            "print(json.dumps(sorted({p['internal_api'] for p in threadpool_info() if p['num_threads'] == 3})))\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    pools, raised = (json.loads(line) for line in res.stdout.splitlines()[-2:])
    assert pools["torch"] == 3 and all(n == 3 for n in pools.values()), pools
    assert "openblas" in raised  # numpy's / scipy's BLAS, above the variable's 1
    assert "threads (--nprocs 3): torch 3" in res.stderr and "--mem-mb 4000" in res.stderr
