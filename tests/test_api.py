"""The CLI and the gRPC service share one library API (surgeon/api.py): defaults are the specs' own."""

import dataclasses

import pytest
import typer

from surgeon import api
from surgeon.cli import app
from surgeon.errors import InvalidInput

SPEC_OF_VERB = {"rank": api.RankSpec, "prune": api.PruneSpec, "sweep": api.SweepSpec, "export": api.ExportSpec}
RENAMED = {"export_format": "format"}  # CLI parameter -> spec field where the names differ


@pytest.mark.parametrize("verb", sorted(SPEC_OF_VERB))
def test_cli_defaults_are_the_specs_defaults(verb):
    command = typer.main.get_command(app).commands[verb]
    spec = SPEC_OF_VERB[verb]
    fields = {f.name: f for f in dataclasses.fields(spec)} | {f.name: f for f in dataclasses.fields(api.ValidationSpec)}
    compared = 0
    for param in command.params:
        field = fields.get(RENAMED.get(param.name, param.name))
        if field is None or field.default is dataclasses.MISSING or field.default is None:
            continue
        assert param.default == field.default, (verb, param.name)
        compared += 1
    assert compared >= 2


def test_a_spec_checks_its_bounds_before_any_work():
    with pytest.raises(InvalidInput, match="m"):
        api.RankSpec(m=0).check()
    with pytest.raises(InvalidInput, match="export format"):
        api.PruneSpec(export="tar").check()
    with pytest.raises(InvalidInput, match="skew_k"):
        api.ValidateSpec(validation=api.ValidationSpec(skew_k=0)).check()
    with pytest.raises(InvalidInput, match="counts"):
        api.SweepSpec(counts=(1, -1)).check()
    api.PruneSpec().check()  # the defaults are valid
