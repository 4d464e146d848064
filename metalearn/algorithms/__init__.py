"""Algorithm registry: name -> make(cfg, model, loss_fn, n_out, n_train_classes) -> Algorithm."""

from __future__ import annotations

from metalearn.algorithms import (
    amortized,
    blackbox,
    cavia,
    finetune,
    imaml,
    maml,
    multitask,
    protonet,
    reptile,
)

ALGORITHMS = {
    "maml": maml.make,
    "anil": maml.make,
    "metasgd": maml.make,
    "mamlpp": maml.make,
    "imaml": imaml.make,
    "cavia": cavia.make,
    "amortized": amortized.make,
    "reptile": reptile.make,
    "finetune": finetune.make,
    "protonet": protonet.make,
    "blackbox": blackbox.make,
    "multitask": multitask.make,
}
