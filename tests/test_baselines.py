"""Low-level baselines (signal/baselines.py) against independent nilearn computations.

Word rate on the real Gentle excerpts of Narratives, phoneme rate from a Gentle
JSON with phones, the envelope of real WAV files (written here in several
sample formats, and the demo's own ``lighthouse_audio.wav``), user regressor
tables, the error messages and exit codes, and ``--baselines auto``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from nilearn.glm.first_level import compute_regressor
from scipy.io import wavfile

from bids_llm_encode.bids.stimuli import read_gentle_csv, read_gentle_json, read_gentle_phones, read_textgrid
from bids_llm_encode.cli import run as cli_run
from bids_llm_encode.config import BASELINES, Config
from bids_llm_encode.errors import EXIT_DATA, EXIT_NO_INPUT, EXIT_USAGE, DataError, MissingInputError, UsageError
from bids_llm_encode.records import Story
from bids_llm_encode.signal import baselines as bl
from bids_llm_encode.workflows.stimulus import run_baselines

from layouts import make_layout


def _cfg(tmp_path, **kw) -> Config:
    return Config(bids_dir=tmp_path / "ds", output_dir=tmp_path / "out", analysis_level="participant",
                  **kw).validate()


def _z(x):
    x = np.asarray(x, float).ravel()
    return (x - x.mean()) / x.std()


def _nilearn(onsets, durations, values, frame_times, hrf="spm"):
    """The reference: nilearn's compute_regressor for one condition, z-scored over the frames."""
    on = np.asarray(onsets, float)
    ev = np.vstack([on, np.broadcast_to(np.asarray(durations, float), on.shape),
                    np.broadcast_to(np.asarray(values, float), on.shape)])
    reg, _ = compute_regressor(ev, hrf, np.asarray(frame_times, float), oversampling=50)
    return _z(reg[:, 0])


def _story(words=("a", "b", "c"), starts=(1.0, 2.0, 3.0), phones=None, name="s") -> Story:
    starts = np.asarray(starts, float)
    return Story(name=name, words=tuple(words), starts=starts, ends=starts + 0.3,
                 aligned=np.ones(len(words), bool), source=Path(f"/x/{name}/align.csv"),
                 phone_starts=None if phones is None else np.asarray(phones, float))


def _frames(n=120, tr=1.5, onset=12.0):
    """Audio-relative frame times of a slice-time-corrected run whose audio starts at ``onset``."""
    return (np.arange(n) + 0.5) * tr - onset


# ---------------------------------------------------------------------------- word and phoneme rate

@pytest.mark.parametrize("story_name", ["pieman", "black"])
@pytest.mark.parametrize("hrf", ["spm", "glover"])
def test_word_rate_equals_nilearn_on_real_gentle_alignments(narratives, tmp_path, story_name, hrf):
    path = narratives / "stimuli" / "gentle" / story_name / "align_excerpt.csv"
    story = read_gentle_csv(path, name=story_name)
    first = float(story.starts.min())
    ft = _frames(n=60, tr=1.5, onset=12.0 - first)  # a run starting 12 s before the excerpt
    X, names = bl.baseline_design(story, ft, _cfg(tmp_path, baselines=["word_rate"], hrf=hrf))
    assert names == ["word_rate"] and X.shape == (60, 1) and X.dtype == np.float64
    # independent: every word of the file (interpolated times for unaligned ones) as a unit event
    rows = list(csv.reader(path.read_text().splitlines()))
    assert len(rows) == story.n_words
    np.testing.assert_allclose(X[:, 0], _nilearn(story.starts, 0.0, 1.0, ft, hrf), atol=1e-9)
    if story_name == "black":
        assert story.n_unaligned > 0  # the interpolated words count too


def _gentle_json_with_phones(narratives, tmp_path) -> tuple[Path, np.ndarray]:
    """A Gentle JSON of the real pieman excerpt with phones, and its phone onsets computed here."""
    from bids_llm_encode.demo.generate import word_phones

    rows = list(csv.reader((narratives / "stimuli" / "gentle" / "pieman" / "align_excerpt.csv")
                           .read_text().splitlines()))
    words, onsets = [], []
    for w, aw, s, e in rows:
        if s == "":
            words.append({"word": w, "case": "not-found-in-audio"})
            continue
        phones = word_phones(w, float(s), float(e))
        t = float(s)
        for ph in phones:
            onsets.append(t)
            t += ph["duration"]
        words.append({"word": w, "alignedWord": aw, "case": "success", "start": float(s), "end": float(e),
                      "phones": phones})
    path = tmp_path / "gentle" / "pieman" / "align.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"transcript": " ".join(r[0] for r in rows), "words": words}))
    return path, np.sort(np.array(onsets))


def test_phoneme_rate_equals_nilearn_on_a_gentle_json_with_phones(narratives, tmp_path):
    path, onsets = _gentle_json_with_phones(narratives, tmp_path)
    story = read_gentle_json(path)
    np.testing.assert_allclose(story.phone_starts, onsets)
    assert story.phone_starts.size > 2 * story.n_words
    np.testing.assert_allclose(read_gentle_phones(path), onsets)
    ft = _frames(n=50, tr=1.5, onset=0.0)
    X, names = bl.baseline_design(story, ft, _cfg(tmp_path, baselines=["word_rate", "phoneme_rate"]))
    assert names == ["word_rate", "phoneme_rate"]
    np.testing.assert_allclose(X[:, 1], _nilearn(onsets, 0.0, 1.0, ft), atol=1e-9)
    np.testing.assert_allclose(X[:, 0], _nilearn(story.starts, 0.0, 1.0, ft), atol=1e-9)
    assert 0.5 < np.corrcoef(X.T)[0, 1] < 0.9999  # related to the word rate, not the same signal


@pytest.mark.parametrize("phones,what", [
    ([{"phone": "dh_B", "duration": -0.1}], "negative phone duration"),
    ([{"phone": "dh_B", "duration": "long"}], "phone duration 'long' is not a number"),
    ([{"phone": "dh_B", "duration": float("nan")}], "not a finite number"),
    ([{"phone": "dh_B"}], "expected an object with 'phone' and 'duration'"),
    ("dh_B", "'phones' must be a list"),
])
def test_bad_phones_name_the_file_and_the_word(tmp_path, phones, what):
    path = tmp_path / "align.json"
    path.write_text(json.dumps({"words": [
        {"word": "I", "case": "success", "start": 0.1, "end": 0.2, "phones": [{"phone": "ay_S", "duration": 0.1}]},
        {"word": "began", "case": "success", "start": 0.3, "end": 0.6, "phones": phones}]}))
    for reader in (read_gentle_json, read_gentle_phones):
        with pytest.raises(DataError) as exc:
            reader(path)
        msg = str(exc.value)
        assert exc.value.exit_code == EXIT_DATA
        assert str(path) in msg and "words[1] ('began')" in msg and what in msg, msg


def test_no_phones_gives_none_and_textgrid_phones_tier(tmp_path):
    path = tmp_path / "align.json"
    path.write_text(json.dumps({"words": [{"word": "a", "case": "success", "start": 0.1, "end": 0.2,
                                           "phones": []}]}))
    assert read_gentle_json(path).phone_starts is None and read_gentle_phones(path) is None
    tg = tmp_path / "s.TextGrid"
    tiers = [("words", [(0, 0.5, ""), (0.5, 0.9, "hello"), (0.9, 1.4, "world")]),
             ("phones", [(0, 0.5, "sil"), (0.5, 0.6, "HH"), (0.6, 0.9, "AH0"), (0.9, 1.1, "W"),
                         (1.1, 1.4, "ER1"), (1.4, 1.5, "sp")])]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "xmin = 0", "xmax = 1.5",
             "tiers? <exists>", f"size = {len(tiers)}", "item []:"]
    for i, (name, items) in enumerate(tiers, 1):
        lines += [f"    item [{i}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                  "        xmin = 0", "        xmax = 1.5", f"        intervals: size = {len(items)}"]
        for k, (a, b, t) in enumerate(items, 1):
            lines += [f"        intervals [{k}]:", f"            xmin = {a}", f"            xmax = {b}",
                      f'            text = "{t}"']
    tg.write_text("\n".join(lines) + "\n")
    story = read_textgrid(tg)
    assert story.words == ("hello", "world")
    np.testing.assert_allclose(story.phone_starts, [0.5, 0.6, 0.9, 1.1])


# ---------------------------------------------------------------------------- envelope

def _modulated_tone(rate: int, seconds: float, onsets, seed: int = 0) -> np.ndarray:
    """A 300 Hz tone switched on for 0.25 s at each word onset, plus faint noise, in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    env = np.zeros_like(t)
    for s in onsets:
        env[(t >= s) & (t < s + 0.25)] = 1.0
    rng = np.random.default_rng(seed)
    return 0.7 * env * np.sin(2 * np.pi * 300 * t) + 0.01 * rng.standard_normal(t.size)


def _reference_envelope(x: np.ndarray, rate: int):
    """Independent envelope: the mean-removed mono signal, rectified, averaged per 10 ms bin."""
    x = np.asarray(x, float)
    if x.ndim == 2:
        x = x.mean(axis=1)
    a = np.abs(x - x.mean())
    per = rate // 100
    assert rate % 100 == 0
    n_full = a.size // per
    values = list(a[: n_full * per].reshape(n_full, per).mean(axis=1))
    if a.size > n_full * per:
        values.append(a[n_full * per:].mean())
    onsets = np.arange(len(values)) * 0.01
    durations = np.full(len(values), 0.01)
    if a.size > n_full * per:
        durations[-1] = (a.size - n_full * per) / rate
    return onsets, durations, np.array(values)


WAV_FORMATS = {
    "uint8-mono-2kHz": (2000, 1, np.uint8),
    "int16-stereo-8kHz": (8000, 2, np.int16),
    "int32-mono-16kHz": (16000, 1, np.int32),
    "float32-stereo-8kHz": (8000, 2, np.float32),
}


def _write_wav(path: Path, x: np.ndarray, rate: int, channels: int, dtype) -> np.ndarray:
    """Write ``x`` (in [-1, 1]) as ``dtype`` samples; returns the samples as written."""
    if channels == 2:
        x = np.column_stack([x, 0.5 * x])
    if dtype == np.uint8:
        pcm = np.clip(np.round(128 + 127 * x), 0, 255).astype(np.uint8)
    elif dtype == np.float32:
        pcm = x.astype(np.float32)
    else:
        full = float(np.iinfo(dtype).max)
        pcm = np.round(x * 0.9 * full).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(path, rate, pcm)
    return pcm


@pytest.mark.parametrize("fmt", list(WAV_FORMATS))
def test_envelope_equals_nilearn_on_a_written_wav(tmp_path, fmt):
    rate, channels, dtype = WAV_FORMATS[fmt]
    words = np.arange(2.0, 38.0, 0.9) + 0.3 * np.sin(np.arange(40))
    x = _modulated_tone(rate, 40.3, words)
    pcm = _write_wav(tmp_path / "s_audio.wav", x, rate, channels, dtype)
    story = _story(words=[f"w{i}" for i in range(words.size)], starts=words)
    ft = _frames(n=40, tr=1.5, onset=6.0)
    X, names = bl.baseline_design(story, ft, _cfg(tmp_path, baselines=["envelope"]),
                                  audio_path=tmp_path / "s_audio.wav")
    assert names == ["envelope"]
    # independent: the envelope computed here from the samples written, one nilearn event per bin
    on, du, va = _reference_envelope(pcm, rate)
    np.testing.assert_allclose(X[:, 0], _nilearn(on, du, va, ft), atol=1e-9)
    # the 10 ms bins do not matter: one nilearn event per audio sample gives the same regressor
    if rate <= 8000 and channels == 1:
        a = np.abs(pcm.astype(float) - pcm.astype(float).mean())
        per_sample = _nilearn(np.arange(a.size) / rate, 1.0 / rate, a, ft)
        assert np.corrcoef(per_sample, X[:, 0])[0, 1] > 0.9999
    # and it follows the words
    assert np.corrcoef(X[:, 0], _nilearn(words, 0.0, 1.0, ft))[0, 1] > 0.9


def test_envelope_of_the_demo_wav_equals_nilearn(tmp_path):
    from bids_llm_encode.demo import generate as gen

    al = gen.align_story(gen.story_text(), seed=0)
    path = tmp_path / "stimuli" / f"{gen.STORY}_audio.wav"
    path.parent.mkdir(parents=True)
    path.write_bytes(gen.audio_wav(al, seed=0))
    with wave.open(str(path)) as w:  # read back with another reader than the app's (scipy)
        assert (w.getsampwidth(), w.getnchannels()) == (1, 1)
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.uint8)
    csv_path = tmp_path / "align.csv"
    csv_path.write_text(gen.alignment_csv(al))
    story = read_gentle_csv(csv_path, name=gen.STORY)
    ft = _frames(n=290, tr=gen.TR, onset=6.0)
    X, names = bl.baseline_design(story, ft, _cfg(tmp_path), audio_path=path)
    assert names == ["word_rate", "envelope"]  # auto: the CSV has no phones
    on, du, va = _reference_envelope(pcm, rate)
    np.testing.assert_allclose(X[:, 1], _nilearn(on, du, va, ft), atol=1e-9)
    assert np.corrcoef(X.T)[0, 1] > 0.8  # the demo's loudness follows the words


def test_envelope_of_ten_minutes_at_44k_is_fast(tmp_path):
    rate = 44100
    rng = np.random.default_rng(1)
    pcm = rng.integers(-8000, 8000, size=600 * rate, dtype=np.int16)
    path = tmp_path / "long.wav"
    wavfile.write(path, rate, pcm)
    ft = _frames(n=420, tr=1.5, onset=10.0)
    t0 = time.perf_counter()
    x = bl.envelope_regressor(path, ft)
    seconds = time.perf_counter() - t0
    assert x.shape == (420,) and np.isfinite(x).all()
    assert seconds < 8.0, seconds  # measured ~0.5-1.2 s on a loaded 2-core machine
    env = bl.audio_envelope(path)
    assert env.values.size == 60000 and np.allclose(env.durations, 0.01)


def test_broken_and_missing_wav(tmp_path, caplog):
    bad = tmp_path / "bad_audio.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    story = _story()
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError) as exc:
        bl.baseline_design(story, _frames(20, onset=0), cfg, audio_path=bad)
    assert str(bad.resolve()) in str(exc.value) and exc.value.exit_code == EXIT_DATA
    with pytest.raises(DataError, match="no samples"):
        wavfile.write(tmp_path / "empty.wav", 8000, np.zeros(0, np.int16))
        bl.audio_envelope(tmp_path / "empty.wav")
    # missing: skipped under auto, logged with the reason
    missing = tmp_path / "nowhere_audio.wav"
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.signal.baselines"):
        statuses = bl.check_baselines(story, cfg, missing)
    env = [s for s in statuses if s.name == "envelope"][0]
    assert not env.used and str(missing) in env.reason and "auto" in env.reason
    assert "skipped" in caplog.text and str(missing) in caplog.text
    X, names = bl.baseline_design(story, _frames(20, onset=0), cfg, audio_path=missing)
    assert names == ["word_rate"]
    # named explicitly: a usage error before anything runs
    with pytest.raises(UsageError) as exc:
        bl.check_baselines(story, _cfg(tmp_path, baselines=["envelope"]), missing)
    assert exc.value.exit_code == EXIT_USAGE and str(missing) in str(exc.value)


# ---------------------------------------------------------------------------- user regressors

def test_user_regressors_word_and_frame_level(tmp_path):
    folder = tmp_path / "regs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    onsets = np.sort(rng.uniform(0, 60, 80))
    surprisal = rng.gamma(2.0, 2.0, 80)
    freq = rng.normal(0, 1, 80)
    (folder / "s.tsv").write_text("onset\tword\tsurprisal\tfrequency\n" + "".join(
        f"{o:.4f}\tw{i}\t{s:.5f}\t{f:.5f}\n" for i, (o, s, f) in enumerate(zip(onsets, surprisal, freq))))
    step = 0.1
    t = np.arange(0, 60, step)
    pitch = np.sin(t / 3.0) + 0.1 * rng.normal(size=t.size)
    (folder / "t.tsv").write_text("onset\tduration\tpitch\n" + "".join(
        f"{a:.3f}\t{step}\t{p:.6f}\n" for a, p in zip(t, pitch)))
    cfg = _cfg(tmp_path, baselines=["none"], baseline_regressors=folder)
    ft = _frames(n=50, tr=1.5, onset=4.0)
    X, names = bl.baseline_design(_story(name="s"), ft, cfg)
    assert names == ["surprisal", "frequency"]
    np.testing.assert_allclose(X[:, 0], _nilearn(np.round(onsets, 4), 0.0, np.round(surprisal, 5), ft),
                               atol=1e-9)
    np.testing.assert_allclose(X[:, 1], _nilearn(np.round(onsets, 4), 0.0, np.round(freq, 5), ft), atol=1e-9)
    X, names = bl.baseline_design(_story(name="t"), ft, cfg)
    assert names == ["pitch"]
    np.testing.assert_allclose(X[:, 0], _nilearn(np.round(t, 3), step, np.round(pitch, 6), ft), atol=1e-9)
    # beside the built-ins, built-ins first
    X, names = bl.baseline_design(_story(name="t"), ft, _cfg(tmp_path, baseline_regressors=folder))
    assert names == ["word_rate", "pitch"]


@pytest.mark.parametrize("content,where", [
    ("time\tvalue\n1.0\t2.0\n", "has no column(s) ['onset']"),
    ("onset\tvalue\n1.0\t2.0\n2.0\tlots\n", "line 3, column 'value': 'lots' is not a number"),
    ("onset\tvalue\n1.0\tn/a\n", "line 2, column 'value': 'n/a' is not a finite number"),
    ("onset\tduration\tvalue\n1.0\t-1\t2\n", "line 2, column 'duration': negative duration"),
    ("onset\tvalue\n1.0\t2.0\t3.0\n", "line 2: 3 cells where the header has 2 columns"),
    ("onset\tvalue\n\t2.0\n", "line 2, column 'onset': an empty cell is not a finite number"),
    ("onset\tword\n1.0\thello\n", "no value column"),
    ("onset\tword_rate\n1.0\t1\n", "column 'word_rate' has the name of a built-in baseline"),
    ("onset\tvalue\n", "a header but no rows"),
    ("onset\tvalue\tvalue\n1\t2\t3\n", "repeats column(s) ['value']"),
    ("onset,value\n1.0,2.0\n", "not tab-separated"),
])
def test_bad_user_tables_name_file_row_and_column(tmp_path, content, where):
    path = tmp_path / "s.tsv"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        bl.read_user_regressors(path)
    assert exc.value.exit_code == EXIT_DATA
    assert str(path) in str(exc.value) and where in str(exc.value), str(exc.value)


def test_constant_baseline_is_dropped_with_a_warning(tmp_path, caplog):
    story = _story(starts=(300.0, 301.0, 302.0))
    ft = _frames(n=30, tr=1.5, onset=0.0)  # the run ends long before the story's words
    with caplog.at_level(logging.WARNING, logger="bids_llm_encode.signal.baselines"):
        X, names = bl.baseline_design(story, ft, _cfg(tmp_path))
    assert X.shape == (30, 0) and names == []
    assert "word_rate is constant at this run's 30 frames" in caplog.text


# ---------------------------------------------------------------------------- options, auto, errors before the model

def test_baselines_option_values(tmp_path):
    assert _cfg(tmp_path).baselines == ["auto"]
    assert _cfg(tmp_path, baselines="word-rate,envelope").baselines == ["word_rate", "envelope"]
    for bad in (["foo"], ["auto", "word_rate"], ["none", "envelope"], []):
        with pytest.raises(UsageError, match="--baselines"):
            _cfg(tmp_path, baselines=bad)
    with pytest.raises(UsageError, match="--baseline-regressors"):
        _cfg(tmp_path, baseline_regressors=tmp_path / "absent")
    assert bl.requested_baselines(_cfg(tmp_path)) == (BASELINES, False)
    assert bl.requested_baselines(_cfg(tmp_path, baselines=["none"])) == ((), True)


def test_auto_picks_what_exists(tmp_path):
    cfg = _cfg(tmp_path)
    wav = tmp_path / "a.wav"
    _write_wav(wav, _modulated_tone(8000, 10.0, [1.0, 2.0, 3.0]), 8000, 1, np.int16)

    def used(story, audio):
        return [s.name for s in bl.baseline_status(story, cfg, audio) if s.used]

    assert used(_story(), None) == ["word_rate"]
    assert used(_story(phones=[1.0, 1.1, 2.0]), None) == ["word_rate", "phoneme_rate"]
    assert used(_story(), wav) == ["word_rate", "envelope"]
    assert used(_story(phones=[1.0, 1.1, 2.0]), wav) == list(BASELINES)
    assert used(_story(phones=[1.0]), tmp_path / "missing.wav") == ["word_rate", "phoneme_rate"]
    ft = _frames(n=20, tr=1.0, onset=2.0)
    X, names = bl.baseline_design(_story(phones=[1.0, 1.1, 2.0, 3.2]), ft, cfg, wav)
    assert names == list(BASELINES) and X.shape == (20, 3)
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(X.std(axis=0), 1, atol=1e-12)
    desc = bl.describe_baselines(bl.baseline_status(_story(), cfg, None))
    assert "word_rate" in desc and "skipped" in desc and "phoneme_rate" in desc


def test_demo_files_give_all_three_and_run_baselines_finds_the_audio(tmp_path):
    """The demo's align.csv, align.json (with phones) and WAV in a dataset: auto makes all three."""
    from bids_llm_encode.bids.inputs import find_runs
    from bids_llm_encode.demo import generate as gen

    ds = make_layout(tmp_path / "ds", n_frames=60)
    al = gen.align_story(gen.story_text(), seed=0)
    gentle = ds / "stimuli" / "gentle" / "pieman"
    (gentle / "align.csv").write_text(gen.alignment_csv(al))
    (gentle / "align.json").write_text(json.dumps(gen.alignment_json(al)))
    (ds / "stimuli" / "pieman_audio.wav").write_bytes(gen.audio_wav(al, seed=0))
    cfg = Config(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant").validate()
    (r,) = find_runs(cfg)
    assert r.story.source.name == "align.csv"  # words from the CSV, phones from the JSON beside it
    assert r.story.phone_starts is not None and r.story.phone_starts.size > 2.5 * r.story.n_words
    X, names = run_baselines(r, None, cfg)
    assert names == list(BASELINES) and X.shape == (r.n_frames, 3)
    # the same as the entry point given the path by hand
    X2, _ = bl.baseline_design(r.story, r.frame_times - r.story_onset, cfg, ds / "stimuli" / r.stim_file)
    np.testing.assert_array_equal(X, X2)
    # a bare story has no audio; --baselines without phoneme_rate does not read the JSON
    _, names = run_baselines(r.story, r.frame_times - r.story_onset, cfg)
    assert names == ["word_rate", "phoneme_rate"]
    (r,) = find_runs(Config(bids_dir=ds, output_dir=tmp_path / "out", analysis_level="participant",
                            baselines=["word_rate"]).validate())
    assert r.story.phone_starts is None


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if the language model would be loaded: every check must come before it."""
    from bids_llm_encode.workflows import stimulus

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the baselines were checked")

    monkeypatch.setattr(stimulus, "get_model", boom)
    monkeypatch.setattr(stimulus, "story_activations", boom)


def _app(ds, tmp_path, *argv):
    return cli_run([str(ds), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                    "--cache-dir", str(tmp_path / "cache"), *argv])


@pytest.mark.parametrize("argv,code,words", [
    (["--baselines", "phoneme_rate"], EXIT_USAGE, ["--baselines phoneme_rate", "has no phones"]),
    (["--baselines", "envelope"], EXIT_USAGE, ["--baselines envelope", "pieman_audio.wav does not exist"]),
    (["--baselines", "loudness"], EXIT_USAGE, ["--baselines 'loudness'"]),
    (["--baseline-regressors", "REGS"], EXIT_NO_INPUT, ["pieman.tsv does not exist"]),
    (["--baseline-regressors", "BADREGS"], EXIT_DATA, ["pieman.tsv, line 2, column 'x': 'oops' is not a number"]),
])
def test_app_refuses_before_the_model(tmp_path, capsys, no_model, argv, code, words):
    ds = make_layout(tmp_path / "ds")
    (ds / "stimuli" / "pieman_audio.wav").unlink()  # no audio (Narratives users may not have it)
    (tmp_path / "regs").mkdir()
    (tmp_path / "badregs").mkdir()
    (tmp_path / "badregs" / "pieman.tsv").write_text("onset\tx\n0.5\toops\n")
    argv = [str(tmp_path / a.lower()) if a in ("REGS", "BADREGS") else a for a in argv]
    rc = _app(ds, tmp_path, *argv)
    err = capsys.readouterr().err
    assert rc == code, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err


def test_app_refuses_a_broken_wav_before_the_model(tmp_path, capsys, no_model):
    ds = make_layout(tmp_path / "ds")
    wav = ds / "stimuli" / "pieman_audio.wav"
    wav.write_bytes(b"not a wav at all")
    rc = _app(ds, tmp_path)
    err = capsys.readouterr().err
    assert rc == EXIT_DATA and "pieman_audio.wav" in err and "cannot read it as a WAV" in err, err
    # the user can go on without the envelope
    assert "--baselines" in err


def test_missing_user_table_names_what_the_folder_holds(tmp_path):
    (tmp_path / "regs").mkdir()
    (tmp_path / "regs" / "other.tsv").write_text("onset\tv\n1\t2\n")
    cfg = _cfg(tmp_path, baseline_regressors=tmp_path / "regs")
    with pytest.raises(MissingInputError) as exc:
        bl.check_baselines(_story(name="s"), cfg)
    assert "s.tsv does not exist" in str(exc.value) and "other.tsv" in str(exc.value)
