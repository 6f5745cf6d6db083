"""The CLI and the gRPC service share one library API (surgeon/api.py) whose options are declared once, as spec
fields (surgeon/core/options.py): the CLI options, the request mapping, the study keys and docs/options.md derive
from them."""

import dataclasses
from pathlib import Path

import pytest
import typer

from surgeon import api
from surgeon.cli import app
from surgeon.core import options
from surgeon.core.errors import InvalidInput
from surgeon.core.options import OnnxExport, RankMethod, declared, from_message, markdown, options_of
from surgeon.v1 import surgeon_pb2 as pb

#: CLI parameters of a verb that are not spec options (its own switches, an argument, a parsed list)
OWN = {"quiet", "as_json", "run_dir", "file", "counts"}


@pytest.mark.parametrize("verb", sorted(api.JOB_SPECS))
def test_a_verbs_options_are_its_specs_fields(verb):
    """Every option field of the verb's spec is a CLI option with the field's flags, help and default, and
    the verb has no other option: an option added to a spec reaches the CLI with nothing else to edit."""
    command = typer.main.get_command(app).commands[verb]
    spec = api.JOB_SPECS[verb]
    expected = {o.name: o for o in options_of(spec) if o.option.cli}
    params = {p.name: p for p in command.params if p.name not in OWN and p.name != "help"}
    assert set(params) == set(expected), verb
    for name, param in params.items():
        option = expected[name].option
        assert param.help == option.help, (verb, name)
        default = None if option.default == () else option.default
        assert param.default == default, (verb, name)
        for flag in option.flags:
            assert set(flag.split("/")) <= set(param.opts) | set(param.secondary_opts), (verb, name, flag)


def test_every_option_has_one_default():
    """An option shared by several specs (n_images, seed, the ranking method ...) is one declaration: the same
    field name never carries two defaults."""
    defaults: dict[str, set] = {}
    for spec in api.JOB_SPECS.values():
        for o in options_of(spec):
            defaults.setdefault(o.name, set()).add(repr(o.option.default))
    assert {name: seen for name, seen in defaults.items() if len(seen) > 1} == {}


def test_a_spec_checks_its_bounds_before_any_work():
    with pytest.raises(InvalidInput, match="m"):
        api.RankSpec(method=RankMethod(m=0)).check()
    with pytest.raises(InvalidInput, match="export format"):
        api.PruneSpec(export="tar").check()
    with pytest.raises(InvalidInput, match="skew_k"):
        api.ValidateSpec(validation=api.ValidationSpec(skew_k=0)).check()
    with pytest.raises(InvalidInput, match="counts"):
        api.SweepSpec(counts=(1, -1)).check()
    with pytest.raises(InvalidInput, match="max_acc_drop must be in -100..100"):
        api.PruneSpec(max_acc_drop=101.0).check()
    api.PruneSpec().check()  # the defaults are valid


def test_every_declared_bound_is_checked():
    """A bound declared on a field is enforced by check_bounds, at both ends."""
    for spec in (RankMethod, OnnxExport, api.ValidationSpec, api.PruneSpec, api.ExportSpec):
        for f in dataclasses.fields(spec):
            option = f.metadata.get(options.OPTION)
            if option is None or option.bound is None:
                continue
            base = api.ExportSpec(Path()) if spec is api.ExportSpec else spec()
            low, high = options.bound_of(option, base)
            below = low - 1 if isinstance(low, int) else low - 0.5
            above = high + 1 if isinstance(high, int) else high * 2 + 1
            for value in (below, above):
                with pytest.raises(InvalidInput, match=f.name):
                    options.check_bounds(dataclasses.replace(base, **{f.name: value}))


def test_requests_map_to_specs_by_field_name():
    """Fields the client sets reach the spec; unset ones take the spec's defaults; path fields are never
    mapped by name (the server confines them to its roots)."""
    request = pb.RankHeadsRequest(span_rank=7, layers="1-2", texts="/etc/passwd")
    method = from_message(RankMethod, request)
    assert (method.span_rank, method.layers, method.m) == (7, "1-2", declared(RankMethod, "m").default)
    assert from_message(api.RankSpec, request, method=method).texts is None
    data = pb.ValidationData(skew_k=3, bias_protocol="paper", data="/etc")
    validation = from_message(api.ValidationSpec, data)
    assert (validation.skew_k, validation.bias_protocol, validation.data) == (3, "paper", None)
    assert from_message(api.ValidationSpec, pb.ValidationData()) == api.ValidationSpec()
    model = from_message(api.ModelSpec, pb.ModelRef(model="x", activation="quickgelu"), model=None)
    assert (model.model, model.activation) == (None, "quickgelu")


def test_the_docs_option_table_is_up_to_date():
    """docs/options.md is generated (`python -m surgeon.api`); an option added without regenerating it
    fails here."""
    assert options.DOCS.read_text(encoding="utf-8") == markdown(api.JOB_SPECS)
