"""Output of a training run that is not going to a terminal: no carriage returns, a line per epoch."""
from __future__ import annotations

import io
import re
import subprocess
import sys

from npmask.training import loop

from test_train import REPO, base_args, tiny  # noqa: F401  (tiny is a fixture)

EPOCH = re.compile(r"^(a|b) \(full\) epoch (\d)/2: train loss \d+\.\d{3} acc \d+\.\d% \| "
                   r"test loss \d+\.\d{3} acc \d+\.\d% \| \d+\.\d s, \d+ img/s \| lr body \S+ head \S+$")


def test_a_log_file_gets_one_plain_line_per_epoch(tiny, tmp_path):  # noqa: F811
    args = [a for a in base_args(tiny, tmp_path / "run") if a != "--quiet"]
    log = tmp_path / "train.log"
    with open(log, "wb") as f:   # what `python -m npmask.train > train.log 2>&1` gives
        proc = subprocess.run([sys.executable, "-m", "npmask.train", *args], cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0
    text = log.read_bytes().decode()   # not read_text(): it would turn "\r" into "\n"
    assert "\r" not in text
    epochs = [m.groups() for m in map(EPOCH.match, text.splitlines()) if m]
    assert epochs == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")], text


def test_quiet_prints_no_epoch_lines(tiny, tmp_path):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "npmask.train", *base_args(tiny, tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert " epoch 1/2" not in proc.stderr + proc.stdout


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_the_bar_is_drawn_in_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    bar = loop._progress(range(3), 3, "x", True)
    assert bar is not None
    bar.close()
    assert loop._progress(range(3), 3, "x", False) is None     # --quiet
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert loop._progress(range(3), 3, "x", True) is None


def test_epoch_line_without_test_set():
    line = loop.epoch_line("base", {"epoch": 3, "train_loss": 0.5, "train_acc": 81.25,
                                    "train_seconds": 2.0, "train_images": 1000, "lr": {"": 0.1}}, 10)
    assert line == "base epoch 3/10: train loss 0.500 acc 81.2% | 2.0 s, 500 img/s | lr 0.1"


def test_importing_npmask_in_a_notebook_without_ipywidgets_warns_nothing():
    """Bars are drawn in a terminal only, so npmask imports plain tqdm: tqdm.auto would warn
    "IProgress not found" into every notebook (the tutorials') that lacks ipywidgets."""
    code = (
        "import sys, types, warnings\n"
        "class ZMQInteractiveShell: pass\n"
        "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')   # as in a kernel\n"
        "sys.modules['IPython'] = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)\n"
        "sys.modules['ipywidgets'] = None                                            # not installed\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import npmask.training.loop, npmask.data.synthetic.generation\n"
        "print([str(w.message).splitlines()[0] for w in caught])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
