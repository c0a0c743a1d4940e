"""Logs worth reading: warnings counted in one line per kind, in full in the stage's log; fold workers
name their fold; progress bars that CI can silence."""

from __future__ import annotations

import logging
import multiprocessing
import warnings

from bonemet.utils import (
    capture_warnings,
    configure_progress,
    log_context,
    progress,
    warning_counts,
    worker_warnings,
)


class LibraryNote(UserWarning):
    pass


def _forked_worker(n: int) -> None:
    for _ in range(n):
        warnings.warn("from a worker", LibraryNote, stacklevel=1)


def test_warnings_go_to_the_log_in_full_and_to_the_screen_once_per_kind(tmp_path, caplog):
    log_file = tmp_path / "logs" / "train.log"
    with caplog.at_level(logging.INFO), capture_warnings(log_file, "train"):
        logging.getLogger("bonemet.x").info("a line of the stage")
        for _ in range(5):  # the same warning repeated: Python's default filter would show it once
            warnings.warn("Maximum iterations (300) reached\nsecond line", LibraryNote, stacklevel=1)
        warnings.warn("another kind", DeprecationWarning, stacklevel=1)
        worker = multiprocessing.get_context("fork").Process(target=_forked_worker, args=(3,))
        worker.start()
        worker.join()
    text = log_file.read_text(encoding="utf-8")
    assert "a line of the stage" in text and "    second line" in text
    counts = warning_counts(log_file)
    assert sorted(counts.values()) == [1, 3, 5]  # the forked worker's three are in the file too
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert len(summary) == 3, summary
    assert summary[0].startswith("train: 5 x LibraryNote at ") and "Maximum iterations (300) reached" in summary[0]
    assert all(f"(full text: {log_file})" in line for line in summary)


def test_warnings_are_captured_after_a_library_routed_them_through_logging(tmp_path):
    """Great Expectations calls ``logging.captureWarnings(True)`` at import, and pytest records each
    test's warnings itself: the stage's log still gets every warning, and none escapes."""
    log_file = tmp_path / "validate.log"
    logging.captureWarnings(True)  # what a library does at import
    try:
        with warnings.catch_warnings(record=True) as escaped:  # what pytest does around each test
            with capture_warnings(log_file, "validate"):
                warnings.warn("after the library's import", LibraryNote, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    assert list(warning_counts(log_file).values()) == [1] and "after the library's import" in log_file.read_text()
    assert escaped == []


def test_without_a_log_file_the_warnings_are_only_counted(tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING), capture_warnings(None, "models"):
        warnings.warn("not actionable", LibraryNote, stacklevel=1)
    assert [r.getMessage().split(" at ")[0] for r in caplog.records] == ["models: 1 x LibraryNote"]
    assert "not actionable" not in capsys.readouterr().err


def test_a_spawned_worker_writes_into_the_stage_log(tmp_path):
    log_file = tmp_path / "evaluate.log"
    log_file.write_text("")
    with worker_warnings(log_file), log_context("[repeat 3]"):
        warnings.warn("in a repeat", LibraryNote, stacklevel=1)
    text = log_file.read_text()
    assert "LibraryNote" in text and "[repeat 3]" in text and "in a repeat" in text


def test_every_record_of_a_fold_worker_names_its_fold(caplog):
    logger = logging.getLogger("bonemet.segmentation.training")
    with caplog.at_level(logging.INFO):
        with log_context("[fold 3]"):
            logger.info("epoch %d: train loss %.4f", 10, 0.5)
        logger.info("after the worker")
    assert [r.getMessage() for r in caplog.records] == ["[fold 3] epoch 10: train loss 0.5000", "after the worker"]


def test_progress_bars_can_be_switched_off_for_the_process(capsys):
    try:
        configure_progress(False)
        assert list(progress(range(3), total=3, desc="quiet")) == [0, 1, 2]
        assert "quiet" not in capsys.readouterr().err
        configure_progress(True)
        list(progress(range(3), total=3, desc="shown"))
        assert "shown" in capsys.readouterr().err
    finally:
        configure_progress(True)


def test_the_command_line_reads_bonemet_progress(monkeypatch, params_file, tmp_path, capsys):
    from bonemet import utils
    from bonemet.cli import main

    monkeypatch.setenv("BONEMET_PROGRESS", "0")
    params = params_file()
    try:
        assert main(["synth", "--params", str(params), str(tmp_path / "c"), "--small", "--n", "2"]) == 0
        assert utils._PROGRESS["enabled"] is False
        assert "synth" not in capsys.readouterr().err.split("INFO")[0]
    finally:
        configure_progress(True)


def test_a_library_routing_warnings_through_logging_does_not_take_them_back_to_the_screen(tmp_path, capsys):
    log_file = tmp_path / "validate.log"
    with capture_warnings(log_file, "validate"):
        logging.captureWarnings(True)  # what Great Expectations does when it is imported
        warnings.warn("module 'sre_parse' is deprecated", DeprecationWarning, stacklevel=1)
    assert "sre_parse" not in capsys.readouterr().err
    assert warning_counts(log_file) == {f"DeprecationWarning at {__file__.split('/')[-1]}:"
                                        f"{_line_of('sre_parse')}": 1}


def _line_of(text: str) -> int:
    lines = open(__file__, encoding="utf-8").read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if text in line and "warnings.warn" in line)
