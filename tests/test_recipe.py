"""Recipes: built-ins load, bad ones fail with a clear one-line message, the resolved form round-trips."""

import subprocess
import sys

import pytest
import yaml

from deploykit.errors import RecipeError
from deploykit.recipe import list_recipes, load_recipe, parse_recipe
from deploykit.stages import STAGES


@pytest.mark.parametrize("name", list_recipes())
def test_builtin_recipes_validate_and_round_trip(name):
    r = load_recipe(name)
    assert r.stages, name
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r


def test_builtin_recipe_set():
    assert {"int8-ptq", "fp16", "bf16", "fp32"} <= set(list_recipes())
    assert load_recipe("int8-ptq").stage_names() == ["fuse_bn", "export_onnx", "quantize_onnx", "quantize_openvino",
                                                     "select_runtime", "tta_policy"]


@pytest.mark.parametrize("name", STAGES.names())
def test_every_stage_config_has_defaults_and_round_trips_in_a_recipe(name):
    cfg = STAGES.get(name).Config()                          # every option has a default
    assert cfg.model_dump()["version"] == 1
    r = parse_recipe({"stages": [{name: cfg.model_dump(mode="json")}]})
    assert r.stage(name).config == cfg                        # the defaults, written out, parse back to themselves
    assert parse_recipe(yaml.safe_load(r.to_yaml())) == r
    with pytest.raises(RecipeError, match=r"stages\.0\.no_such_option: Extra inputs are not permitted"):
        parse_recipe({"stages": [{name: {"no_such_option": 1}}]})


@pytest.mark.parametrize("data, match", [
    ({"stages": ["fuse_bnn"]}, r"unknown stage 'fuse_bnn'.*did you mean fuse_bn"),
    ({"stages": [{"quantize_onnx": {"methd": "minmax"}}]}, r"stages\.0\.methd: Extra inputs are not permitted"),
    ({"stages": [{"quantize_onnx": {"method": "median"}}]}, r"stages\.0\.method: Input should be"),
    ({"stages": ["fuse_bn"], "target": "tpu"}, r"target: Input should be"),
    ({"stages": ["fuse_bn"], "colour": 1}, r"colour: Extra inputs are not permitted"),
    ({"stages": ["fuse_bn"], "version": 2}, r"version: Input should be 1"),
    ({}, r"stages: Field required"),
    ([1, 2], r"is not a mapping"),
])
def test_bad_recipes_fail_clearly(data, match):
    with pytest.raises(RecipeError, match=match) as exc:
        parse_recipe(data)
    assert "\n" not in str(exc.value) and "Fix:" in str(exc.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found.*int8-ptq"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [fuse_bn\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_overrides_are_typed_and_checked():
    r = load_recipe("int8-ptq").with_overrides({"stages.quantize_onnx.method": "entropy", "data.name": "x",
                                                 "data.calibration_images": None})
    assert r.stage("quantize_onnx").config.method == "entropy"
    assert r.data.name == "x" and r.data.calibration_images == 300
    with pytest.raises(RecipeError, match="needs stage 'quantize_onnx'"):
        load_recipe("fp32").with_overrides({"stages.quantize_onnx.method": "entropy"})
    with pytest.raises(RecipeError, match="calibration_images: Input should be greater than or equal to 1"):
        load_recipe("int8-ptq").with_overrides({"data.calibration_images": 0})


def test_cli_dry_run_prints_resolved_recipe(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--int8", "--data", "fashion-mnist",
                          "--calibration-method", "percentile", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resolved = parse_recipe(yaml.safe_load(out.stdout))
    assert resolved.name == "int8-ptq" and resolved.data.name == "fashion-mnist"
    assert resolved.stage("quantize_onnx").config.method == "percentile"
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_set_overrides_any_recipe_field_and_refuses_bad_ones():
    def dry(*sets):
        return subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--int8", "--dry-run",
                               *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True)

    out = dry("stages.select_runtime.early_stop=false", "stages.select_runtime.batch_sizes=[1, 8]")
    assert out.returncode == 0, out.stderr
    cfg = parse_recipe(yaml.safe_load(out.stdout)).stage("select_runtime").config
    assert cfg.early_stop is False and cfg.batch_sizes == [1, 8]
    for bad, message in (("nope", "error: --set 'nope' is not KEY=VALUE"),
                         ("stages.select_runtime.bogus=1", "error: invalid recipe int8-ptq + overrides: "
                                                           "stages.4.bogus: Extra inputs are not permitted")):
        out = dry(bad)
        assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_cli_conflicting_presets_exit_2():
    out = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--int8", "--fp16", "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: choose one of") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("recipe, stage, field", [("int8-ptq", "accuracy_guard", "max_drop"),
                                                  ("prune-kd-int8", "accuracy_guard", "max_drop"),
                                                  ("qat-int8", "select_runtime", "max_top1_drop"),
                                                  ("prune-latency-int8", "select_runtime", "max_top1_drop")])
def test_cli_max_drop_sets_the_budget_of_the_stage_that_decides(recipe, stage, field):
    # PTQ: the accuracy guard keeps layers in float; QAT: select_runtime refuses variants over the budget
    # (the guard would re-quantize a QAT model with PTQ); latency-targeted pruning: select_runtime, against the
    # original model, at the end of the chain
    out = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--recipe", recipe,
                          "--max-drop", "0.7", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resolved = parse_recipe(yaml.safe_load(out.stdout))
    assert getattr(resolved.stage(stage).config, field) == 0.7
    assert (resolved.stage("accuracy_guard") is None) == (recipe in ("qat-int8", "prune-latency-int8"))


def test_cli_target_latency_selects_the_chain_budget_recipe():
    out = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--target-latency", "0.4x",
                          "--max-f1-drop", "0.8", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = parse_recipe(yaml.safe_load(out.stdout))
    assert r.name == "prune-latency-int8" and r.stage("prune").config.target_latency == "0.4x"
    sel = r.stage("select_runtime").config
    assert (sel.max_macro_f1_drop, sel.drops_vs) == (0.8, "original")
    both = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--target-latency", "0.4x",
                           "--prune", "0.5", "--dry-run"], capture_output=True, text=True)
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "--prune and --target-latency" in both.stderr


def test_cli_balance_sets_every_fine_tuning_stage_and_is_refused_without_one():
    out = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--recipe", "prune-kd-qat-int8",
                          "--balance", "sampler", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = parse_recipe(yaml.safe_load(out.stdout))
    assert (r.stage("distill").config.balance, r.stage("qat").config.balance) == ("sampler", "sampler")
    assert r.stage("distill").config.transfer == "balanced"
    ptq = subprocess.run([sys.executable, "-m", "deploykit", "compress", "ckpt.pth", "--int8", "--balance", "sampler",
                          "--dry-run"], capture_output=True, text=True)
    assert ptq.returncode == 2 and ptq.stderr.count("\n") == 1
    assert "--balance needs a recipe that fine-tunes" in ptq.stderr


def test_recipes_keep_repeated_stages_and_address_them_by_index():
    r = parse_recipe({"stages": ["fuse_bn", "export_onnx", "fuse_bn"]})
    assert r.with_overrides({"data.seed": 3}).stage_names() == ["fuse_bn", "export_onnx", "fuse_bn"]
    assert r.with_overrides({"stages.1.opset": 18}).stages[1].config.opset == 18
    assert r.with_overrides({"stages.export_onnx.opset": 16}).stages[1].config.opset == 16  # unique: by name
    with pytest.raises(RecipeError, match=r"lists stage 'fuse_bn' 2 times \(at 0, 2\).*stages\.0\.<field>"):
        r.with_overrides({"stages.fuse_bn.version": 1})
    with pytest.raises(RecipeError, match=r"no stage at index 3 .*use an index from 0 to 2"):
        r.with_overrides({"stages.3.version": 1})
    # the resolved YAML keeps both, in order
    assert parse_recipe(yaml.safe_load(r.to_yaml())).stage_names() == ["fuse_bn", "export_onnx", "fuse_bn"]


def test_cli_lists_what_the_registries_hold():
    """`deploykit recipes` is read from the registries: every stage, runtime variant and dataset appears."""
    from deploykit.data import DATASETS
    from deploykit.variants import RUNTIME_VARIANTS

    out = subprocess.run([sys.executable, "-m", "deploykit", "recipes"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(STAGES.names()) | set(RUNTIME_VARIANTS.names()) | set(DATASETS.names()) | set(list_recipes()) == listed
