"""Issue 28, wall 5: two trainings into one run folder. The second stops naming the PID of the first, nothing
of the first's is touched; a lock left by a killed process is detected as stale and taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ddad.cli import main
from ddad.runs import RunDir


def _train(root, run, *extra) -> int:
    return main(["train", "--data-root", str(root), "--category", "washer", "--model", "tiny", "--image-size", "32",
                 "--max-steps", "1", "--batch-size", "4", "--val-ratio", "0", "--backbone-weights", "random",
                 "--quiet", "--run-dir", str(run), *extra])


HOLD = """
import sys, time
from ddad.runs import RunDir
with RunDir(sys.argv[1]).locked("training"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_training_of_a_run_stops_naming_the_first_and_a_stale_lock_is_taken_over(synth_root, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run.iterdir())
        assert _train(synth_root, run) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {holder.pid}" in err and "training since" in err
        assert sorted(p.name for p in run.iterdir()) == before  # nothing written: no config, no checkpoint
        assert _train(synth_root, run, "--resume") == 2  # a resume is refused as well
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the file stays, naming it
        holder.wait()
    assert f"PID {holder.pid}" in (run / ".lock").read_text()
    assert _train(synth_root, run) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and f"PID {holder.pid}" in err
    assert RunDir(run).latest_checkpoint() is not None
    assert (run / ".lock").read_text() == ""  # released at the end


def test_the_lock_is_held_for_the_whole_training_and_released_after(synth_root, tmp_path, monkeypatch):
    """While the training steps, its own lock file names this process; a second lock attempt (another open
    file, as another process would make) fails."""
    from ddad.methods.ddad import method as ddad_method
    from ddad.runs import RunInUse

    run = tmp_path / "run"
    seen = []
    real_fit = ddad_method.fit  # the engine's training loop, as DDAD's method calls it

    def watching(*args, **kwargs):
        seen.append((run / ".lock").read_text())
        try:
            with RunDir(run).locked("training"):
                seen.append("acquired twice")
        except RunInUse as exc:
            seen.append(str(exc))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(ddad_method, "fit", watching)
    assert _train(synth_root, run) == 0
    assert seen and seen[0].startswith(f"PID {os.getpid()} ") and "acquired twice" not in seen
    assert "in use by PID" in seen[1]
    started = time.time()
    with RunDir(run).locked("training"):  # free again
        assert time.time() - started < 5
