"""Backend options are data on the class (``OPTIONS``), parsed by one function; every verb
opens backends through ``registry.open_backend``; the backend list is the entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.errors import UsageError
from opbench.harness import registry
from opbench.protocol import Backend, Option, parse_bool, parse_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("word,value", [("on", True), ("OFF", False), ("true", True),
                                        ("false", False), ("1", True), ("0", False),
                                        (1, True), (0, False), (True, True)])
def test_one_on_off_parser(word, value):
    assert parse_bool("x", word) is value


@pytest.mark.parametrize("bad", ["maybe", "", 2, 0.5])
def test_on_off_parser_refuses_other_values(bad):
    with pytest.raises(ValueError, match="x=.* must be on/off"):
        parse_bool("x", bad)


def test_options_parse_ints_floats_choices_and_fill_defaults():
    declared = (Option("n", int, 3, ""), Option("ms", float, 2.0, ""),
                Option("mode", str, "a", "", ("a", "b")), Option("auto", int, None, ""))
    assert parse_options("be", declared, {"n": "7", "ms": "1.5", "mode": "b"}) == {
        "n": 7, "ms": 1.5, "mode": "b", "auto": None}
    for bad in ({"n": "7.5"}, {"n": True}, {"ms": "fast"}, {"mode": "c"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_options("be", declared, bad)
    with pytest.raises(ValueError, match="unknown be backend option.*valid options: n, ms"):
        parse_options("be", declared, {"nn": 1})


def test_bool_options_of_cupy_and_triton_read_off_as_false():
    from opbench.backends.cpu import CpuBackend
    from opbench.backends.cupy import CupyBackend

    assert CupyBackend(rope_cache="off").rope_cache is False
    assert CupyBackend(sync_each_launch="on").sync_each_launch is True
    assert CpuBackend(rope_cache="off").rope_cache is False
    ok, _ = registry.backend_class("triton").available()
    if ok:
        from opbench.backends.triton import TritonBackend

        backend = TritonBackend(mode="interpreter", decode_split="off")
        assert backend.decode_split is False
        backend.close()


def test_the_backend_list_is_the_entry_points_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with (ROOT / "pyproject.toml").open("rb") as file:
        declared = tomllib.load(file)["project"]["entry-points"]["opbench.backends"]
    assert registry.registered() == declared
    assert registry._declared_in_pyproject() == declared


@pytest.mark.parametrize("name", registry.registered_names())
def test_unknown_option_is_a_usage_error_naming_the_valid_ones(name, capsys):
    cls = registry.backend_class(name)
    code = main(["test", "-b", f"{name}:no_such_option=1", "--quick", "-o", "CPY"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no_such_option" in err and "valid options:" in err
    for option in cls.OPTIONS:
        assert option.name in err


@pytest.mark.parametrize("verb", [["test", "--quick", "-o", "CPY"], ["support", "-o", "CPY"],
                                  ["perf", "--sizes", "small", "-o", "CPY"], ["scenario"]])
def test_every_verb_refuses_a_bad_option_value(verb, capsys):
    assert main([*verb, "-b", "cpu:rope_cache=maybe"]) == 2
    assert "rope_cache='maybe' must be on/off" in capsys.readouterr().err


def test_rope_cache_flag_is_the_option_and_refused_where_not_declared(capsys):
    assert main(["test", "--quick", "-o", "ROPE", "-b", "ggml", "--rope-cache", "off"]) == 2
    assert "unknown ggml backend option(s) rope_cache" in capsys.readouterr().err


def test_split_backend_list_keeps_options_with_their_ref():
    assert registry.split_backend_list("cpu:rope_cache=off,jit=0,torch,x.py:C:a=1") == [
        "cpu:rope_cache=off,jit=0", "torch", "x.py:C:a=1"]


def test_open_backend_applies_ref_options_over_flags_and_opens_one_device():
    backend = registry.open_backend("cpu:rope_cache=off", {"rope_cache": "on", "jit": "off"})
    try:
        assert backend.rope_cache is False and backend.jit is False
        assert [str(d) for d in backend.device_list()] == ["cpu:0"]
        assert registry.device_label(backend) == "cpu:0"
    finally:
        backend.close()


def test_file_class_reference_takes_options(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from opbench.protocol import Backend, Option\n"
                    "class Mine(Backend):\n    name = 'mine'\n"
                    "    OPTIONS = (Option('tile', int, 16, 'tile size'),)\n")
    backend = registry.open_backend(f"{path}:Mine:tile=32")
    assert backend.options == {"tile": 32}
    with pytest.raises(UsageError, match="unknown mine backend option"):
        registry.open_backend(f"{path}:Mine:tyle=32")


def test_a_backends_label_names_the_options_that_differ_from_their_defaults():
    assert registry.backend_label("cpu") == "cpu"
    assert registry.backend_label("cpu:rope_cache=on") == "cpu"  # the default, however typed
    assert registry.backend_label("cpu:rope_cache=0") == "cpu:rope_cache=off"
    assert registry.backend_label("cpu:rope_cache=off,jit=off") == "cpu:jit=off,rope_cache=off"
    assert registry.backend_label("cpu", {"rope_cache": "off"}) == "cpu:rope_cache=off"
    assert registry.backend_label("cpu:rope_cache=on", {"rope_cache": "off"}) == "cpu"


def test_file_class_label_is_its_name_with_its_options(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from opbench.protocol import Backend, Option\n"
                    "class Mine(Backend):\n    name = 'mine'\n"
                    "    OPTIONS = (Option('tile', int, 16, 'tile size'),)\n")
    assert registry.backend_label(f"{path}:Mine") == "mine"
    assert registry.backend_label(f"{path}:Mine:tile=32") == "mine:tile=32"


def test_two_configurations_of_one_backend_keep_apart_in_the_records(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    assert main(["test", "--quick", "-o", "ROPE", "-p", "type=f32", "-b",
                 "cpu,cpu:rope_cache=off", "--results", str(results), "-q"]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    by_backend = {name: sorted(r["case_id"] for r in records if r["backend"] == name)
                  for name in {r["backend"] for r in records}}
    assert set(by_backend) == {"cpu", "cpu:rope_cache=off"}
    assert by_backend["cpu"] == by_backend["cpu:rope_cache=off"] and by_backend["cpu"]
    assert "Backend cpu:rope_cache=off: OK" in capsys.readouterr().out


def test_test_and_perf_call_one_configuration_by_one_name(tmp_path):
    names = {}
    for verb, extra in (("test", ["--quick"]), ("perf", ["--sizes", "small", "--budget-ms",
                                                         "5", "--no-calibrate"])):
        results = tmp_path / f"{verb}.jsonl"
        assert main([verb, *extra, "-o", "CPY", "-p", "type_src=f32,type=f32,ne=.(5,3|64,4),",
                     "-b", "cpu:jit=off", "--results", str(results), "-q"]) == 0
        lines = results.read_text().splitlines()
        names[verb] = {json.loads(line)["backend"] for line in lines}
    assert names == {"test": {"cpu:jit=off"}, "perf": {"cpu:jit=off"}}


def test_a_plug_in_that_inherits_its_name_is_called_by_its_class(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from opbench.backends.cpu import CpuBackend\n"
                    "class Mine(CpuBackend):\n    pass\n")
    assert registry.backend_label(f"{path}:Mine") == "Mine"
    assert registry.backend_label(f"{path}:Mine:jit=off") == "Mine:jit=off"
    assert {registry.backend_label(name) for name in registry.registered_names()} == set(
        registry.registered_names())  # the built-ins keep their names


def test_two_backends_that_records_would_call_alike_are_refused(tmp_path, capsys):
    path = tmp_path / "alike.py"
    path.write_text("from opbench.backends.cpu import CpuBackend\n"
                    "class SameName(CpuBackend):\n    name = 'cpu'\n")
    assert main(["test", "--quick", "-o", "CPY", "-b", f"cpu,{path}:SameName"]) == 2
    err = capsys.readouterr().err
    assert "would both be called 'cpu'" in err and "Traceback" not in err


def test_doctor_writes_switches_as_the_options_take_them(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cpu = next(line for line in lines if line.startswith("cpu "))
    assert "rope_cache=on" in cpu and "jit=on" in cpu and "True" not in cpu
    assert "option rope_cache=on (on/off)" in "\n".join(lines)
    assert not [line for line in lines if "available  available=" in line]


def test_declared_abilities_have_harmless_defaults():
    backend = Backend()
    assert backend.is_interpreter is False and backend.timer() is None
    assert backend.flush_l2() is None and backend.device_list() == [None]
    with pytest.raises(NotImplementedError, match="cannot hold"):
        backend.hold(None)
    assert backend.empty((2,), "float32").tolist() != [0.0, 0.0]  # poisoned with NaN
