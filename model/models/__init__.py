"""Model registry: name -> (class, config class)."""

from model.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from model.models.mlsa4rec import MLSA4Rec, MLSA4RecConfig, MLSA4RecS
from model.models.sasrec import SASRec, SASRecConfig

MODELS = {
    "mlsa4rec-s": (MLSA4RecS, MLSA4RecConfig),
    "mlsa4rec": (MLSA4Rec, MLSA4RecConfig),
    "sasrec": (SASRec, SASRecConfig),
    "mamba4rec": (Mamba4Rec, Mamba4RecConfig),
}


def model_classes(name: str):
    """(model class, config class) of a registered model; ValueError naming the choices."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, n_items: int, config: dict | None = None):
    model_cls, config_cls = model_classes(name)
    try:
        config = config_cls(**(config or {}))
    except TypeError as exc:                  # a hyper-parameter this model does not have
        raise ValueError(f"{name}: {exc}") from None
    return model_cls(n_items, config)
