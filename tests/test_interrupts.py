"""Ctrl-C at any moment of a run saves a step boundary: the resumed run is bit-identical.

A real SIGINT (signal.raise_signal, what Ctrl-C sends) is raised at every phase of a training
step and of the work around it: after the batch is drawn, inside the forward, inside the
backward, half-way through the optimizer's update, during an evaluation, during a save, and
during the final evaluation. Each interrupted run is then resumed to the end, and its weights,
optimizer moments, step and every generator must equal those of a run never interrupted, bit
for bit. A tiny U-Net keeps this fast.
"""
import signal

import numpy as np
import pytest

import tinyunet.checkpoint as checkpoint_module
import tinyunet.train as train_module
from tinyunet.checkpoint import load_checkpoint
from tinyunet.data import synthetic_membranes
from tinyunet.train import Trainer, TrainOptions, resume_options

STEPS = 4


@pytest.fixture(autouse=True)
def quick_figures(request, monkeypatch):
    """matplotlib takes seconds per figure: the figures are drawn for real only where a test
    checks them (the final evaluation); elsewhere an empty file stands in."""
    if "final evaluation" not in request.node.name:
        import tinyunet.plots as plots
        monkeypatch.setattr(plots, "save_curves", lambda history, path: path.touch())
        monkeypatch.setattr(plots, "save_montage", lambda images, targets, probabilities, names, path, t: path.touch())


def options(out, **changes):
    values = dict(out=str(out), base_width=4, depth=2, crop=32, batch=2, steps=STEPS, eval_every=2,
                  checkpoint_every=2, lr=1e-3, progress=False, minutes=60.0, augment="elastic")
    values.update(changes)
    return TrainOptions(**values)


@pytest.fixture(scope="module")
def data():
    return synthetic_membranes(4, size=48, seed=1)


def state_of(trainer):
    """Everything that decides the next steps: weights, Adam's moments and step, every generator."""
    state = {f"param/{k}": v.copy() for k, v in trainer.model.parameters().items()}
    state.update({f"optim/{k}": np.copy(v) for k, v in trainer.optimizer.state_dict().items()})
    state["step"] = trainer.step
    state["batches"] = trainer.batch_rng.bit_generator.state
    state.update({f"dropout/{k}": rng.bit_generator.state for k, rng in trainer.model.random_generators().items()})
    return state


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    import tinyunet.plots as plots
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "save_curves", lambda history, path: path.touch())
        patch.setattr(plots, "save_montage", lambda images, targets, probabilities, names, path, t: path.touch())
        trainer = Trainer(options(tmp_path_factory.mktemp("straight")), data, log=lambda m: None)
        result = trainer.fit()
    assert not result["interrupted"] and result["step"] == STEPS
    return state_of(trainer)


class CtrlC:
    """Sends SIGINT once, the first time ``fire()`` is called while ``when()`` is true."""

    def __init__(self, when):
        self.when, self.sent = when, False

    def fire(self):
        if not self.sent and self.when():
            self.sent = True
            signal.raise_signal(signal.SIGINT)


def wrap(fire, function):
    def wrapped(*args, **kwargs):
        fire()
        return function(*args, **kwargs)
    return wrapped


class HalfwayGradients(dict):
    """The gradients, sending Ctrl-C when the optimizer has updated half of the parameters
    (Adam reads every gradient once to check it, then once per update)."""

    def __init__(self, grads, fire):
        super().__init__(grads)
        self.reads, self.fire = 0, fire

    def __getitem__(self, name):
        self.reads += 1
        if self.reads == len(self) + len(self) // 2:
            self.fire()
        return super().__getitem__(name)


def inject(phase, trainer, monkeypatch):
    """Arm a Ctrl-C in ``phase`` of step 3 (or of the evaluation / save at step 2, or of the
    final evaluation); returns the CtrlC to check that it was sent."""
    in_step_3 = CtrlC(lambda: trainer.step == 2 and trainer.model.training)   # not the evaluation at step 2
    if phase == "after the batch is drawn":
        real = train_module.random_crops
        monkeypatch.setattr(train_module, "random_crops", lambda *a, **k: (real(*a, **k), in_step_3.fire())[0])
    elif phase == "inside forward":
        layer = trainer.model.layers["down2.conv1"]
        layer.forward = wrap(in_step_3.fire, layer.forward)
    elif phase == "inside backward":
        layer = trainer.model.layers["up2.conv1"]
        layer.backward = wrap(in_step_3.fire, layer.backward)
    elif phase == "inside the optimizer":
        real = trainer.model.gradients
        trainer.model.gradients = lambda: HalfwayGradients(real(), in_step_3.fire)
    elif phase == "during evaluation":
        at_step_2 = CtrlC(lambda: trainer.step == 2)
        trainer.predict = wrap(at_step_2.fire, trainer.predict)
        return at_step_2
    elif phase == "during save":
        at_step_2 = CtrlC(lambda: trainer.step == 2)
        monkeypatch.setattr(checkpoint_module.np, "savez", wrap(at_step_2.fire, np.savez))
        return at_step_2
    elif phase == "during the final evaluation":
        at_the_end = CtrlC(lambda: trainer.step == STEPS)
        trainer.predict = wrap(at_the_end.fire, trainer.predict)
        return at_the_end
    return in_step_3


PHASES = ["after the batch is drawn", "inside forward", "inside backward", "inside the optimizer",
          "during evaluation", "during save", "during the final evaluation"]


@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_in_any_phase_saves_a_step_boundary_and_resumes_bit_identically(
        phase, tmp_path, data, uninterrupted):
    lines = []
    before = signal.getsignal(signal.SIGINT)    # Python's default, or SIG_IGN in a job started with '&'
    trainer = Trainer(options(tmp_path), data, log=lines.append)
    with pytest.MonkeyPatch.context() as patch:
        ctrl_c = inject(phase, trainer, patch)
        result = trainer.fit()
    assert ctrl_c.sent and result["interrupted"]
    expected_stop = {"during evaluation": 2, "during save": 2, "during the final evaluation": STEPS}.get(phase, 3)
    assert result["step"] == expected_stop                        # the step in flight was finished
    for name in ("checkpoint.npz", "report.txt", "montage.png", "metrics.json"):
        assert (tmp_path / name).is_file(), name                  # the run still leaves everything
    assert load_checkpoint(tmp_path / "checkpoint.npz").step == expected_stop
    assert signal.getsignal(signal.SIGINT) is before                      # the handler is put back
    if expected_stop < STEPS:
        assert any(f"interrupted at step {expected_stop}" in line for line in lines)
        resumed = Trainer(resume_options(tmp_path), data, log=lambda m: None)
        assert resumed.step == expected_stop
        resumed.fit()
        assert_same_state(state_of(resumed), uninterrupted)
    else:
        assert_same_state(state_of(trainer), uninterrupted)


def test_a_second_ctrl_c_inside_a_step_saves_nothing_torn(tmp_path, data, uninterrupted):
    """Ctrl-C twice: it stops at once, and since a step was half done nothing is saved; the
    checkpoint of step 2 stays, and resuming it is bit-identical."""
    lines = []
    trainer = Trainer(options(tmp_path), data, log=lines.append)
    real = trainer.model.gradients

    def stop_now():
        if trainer.step == 2:
            raise KeyboardInterrupt          # what the second Ctrl-C raises, half-way through Adam

    trainer.model.gradients = lambda: HalfwayGradients(real(), stop_now)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert any("stopped at once inside step 3: nothing saved" in line for line in lines)
    assert load_checkpoint(tmp_path / "checkpoint.npz").step == 2
    assert not (tmp_path / "report.txt").exists()
    resumed = Trainer(resume_options(tmp_path), data, log=lambda m: None)
    resumed.fit()
    assert_same_state(state_of(resumed), uninterrupted)
