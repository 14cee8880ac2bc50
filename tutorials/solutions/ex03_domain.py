"""Solutions to the exercises of tutorial 3 (adding a domain).

3.1 ``train_with_one_optimizer``: train a domain the PyTorch way, one Adam over
    ``model.parameters()`` (the frozen backbone weights have no gradient and are skipped).
3.2 ``predict_image_file``: write a test image as a PNG file and classify it with
    ``model.predict``, as you would a photo of your own.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from npmask.optim import Adam
from npmask.training.loop import evaluate, train_epoch


def train_with_one_optimizer(model, domain: str, train_it, test_it, epochs: int = 1, lr: float = 1e-3):
    """Train ``domain`` of ``model`` with Adam(model.parameters()); returns its test accuracy (%)."""
    model.set_domain(domain)
    opt = Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        train_epoch(model, train_it.epoch(epoch), opt, num_batches=len(train_it), progress=False)
    return evaluate(model, test_it)["acc"]


def predict_image_file(model, domain: str, image, folder) -> tuple[str, float]:
    """Save ``image`` (uint8 H x W x C) as a PNG in ``folder`` and classify the file:
    returns (class name, probability)."""
    path = Path(folder) / "my_image.png"
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
    return model.predict([path], domain=domain).top(1)[0][0]
