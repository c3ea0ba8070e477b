"""One source of defaults per parameter: the notebook's parameters cell declares every config field."""
from dataclasses import fields
from pathlib import Path

import pytest

from lib import config
from lib.run.params import notebook_parameters
from lib.sequence.strategies import SeqConfig
from lib.train.fit import TrainConfig

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks" / "ich"


@pytest.mark.parametrize("cls, notebook", [(TrainConfig, "02_train_cnn.ipynb"), (SeqConfig, "04_sequence.ipynb")])
def test_every_config_field_is_a_notebook_parameter_without_a_dataclass_default(cls: type, notebook: str):
    declared = notebook_parameters(NOTEBOOKS / notebook)
    aliases = getattr(cls, "PARAMS", {})
    for f in fields(cls):
        names = aliases.get(f.name, (f.name,))
        assert all(n in declared for n in names), f"{cls.__name__}.{f.name}: {names} not in {notebook}'s parameters"
        if not config.is_runtime(f):
            assert not config.has_default(f), f"{cls.__name__}.{f.name} has a default; the notebook holds it"
    assert set(config.experiment_fields(cls)) >= {"lr", "epochs", "seed"}


def test_none_if_unset_maps_only_the_documented_literals():
    out = config.none_if_unset({"a": "", "b": 0, "c": 0, "d": False}, {"a": "", "b": 0, "d": 0})
    assert out == {"a": None, "b": None, "c": 0, "d": False}  # False is not the count 0
