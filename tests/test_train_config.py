"""DistillConfig: the reference config loads, bad files say where and why, the fingerprint
identifies the content (not its layout), diff names exactly the changed keys, and the
curriculum scales the loss weights."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import yaml

from kdtrain.errors import ConfigError
from kdtrain.train.config import ABSENT, LOSS_NAMES, Change, DistillConfig, diff, load_config

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "distill_reference.yaml"


def reference_data() -> dict:
    return yaml.safe_load(REFERENCE.read_text())


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def edited(data: dict, key: str, value) -> dict:
    """``data`` with the dotted ``key`` set to ``value`` (created if absent)."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return data


def test_reference_config_loads():
    config = load_config(REFERENCE)
    assert config.optim.steps == 24 and config.optim.schedule == "cosine" and config.optim.lr == 3e-4
    assert config.data.batch_size == 2 and config.data.max_length == 512
    assert config.checkpoint.every_n_steps == 8 and config.balance.every_n_steps == 4
    assert [stage.name for stage in config.curriculum] == ["imitate", "tools", "latent"]
    assert config.losses.intermediate_layers == ((0, 0), (1, 14), (2, 29))
    assert config.fingerprint().startswith("sha256:") and len(config.fingerprint()) == 7 + 64
    assert [stage.on_policy for stage in config.curriculum] == [0.0, 0.0, 0.25] and config.on_policy.max_new_tokens == 48
    assert config.telemetry.length_collapse == 0.4 and config.telemetry.prompts == 8 and not config.telemetry.override
    with pytest.raises(Exception):
        config.optim = None  # frozen


@pytest.mark.parametrize("key, value, where, expected, found", [
    ("losses.kl", -1.0, "losses.kl", "greater than or equal to 0", "-1.0"),
    ("losses.kl_temperature", 0, "losses.kl_temperature", "greater than 0", "0"),
    ("losses.kl_direction", "sideways", "losses.kl_direction", "'forward' or 'reverse'", "'sideways'"),
    ("losses.kll", 1.0, "losses.kll", "one of the keys ce, code_mode,", "unknown key 'kll'"),
    ("optimizer", {"lr": 1.0}, "optimizer", "one of the keys balance, budgets, checkpoint,", "unknown key 'optimizer'"),
    ("optim.schedule", "linear", "optim.schedule", "'constant' or 'cosine'", "'linear'"),
    ("optim.warmup_steps", 25, "optim.warmup_steps", "at most steps (24)", "25"),
    ("optim.lr", "fast", "optim.lr", "a valid number", "'fast'"),
    ("data.batch_size", 0, "data.batch_size", "greater than or equal to 1", "0"),
    ("data.tool_schema_version", "2", "data.tool_schema_version", r"a string matching ^\d+\.\d+$", "'2'"),
    ("teacher.version", "", "teacher.version", "at least 1 character(s)", "''"),
    ("teacher.backend", "openai", "teacher.openai", "base_url and model since backend is openai", "None"),
    ("teacher.openai", {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}, "teacher.openai",
     "no endpoint since backend is local (or backend: openai)", "'an endpoint'"),
    ("teacher", {"backend": "openai", "name": "t", "version": "v1", "source": {"format": "transformers", "path": "tok"},
                 "openai": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}},
     "teacher.mode", "'generate' since backend is openai (a chat API cannot score given text)", "'score'"),
    ("teacher.openai", {"base_url": "http://user:pw@host/v1", "model": "m"}, "teacher.openai.base_url", "a string matching", "'http://user:pw@host/v1'"),
    ("teacher.source", None, "teacher.source", "a valid dictionary or instance of TeacherSource", "None"),
    ("teacher.source.format", "onnx", "teacher.source.format", "'transformers' or 'gguf'", "'onnx'"),
    ("student.layers", [3, 1], "student.layers", "strictly increasing teacher layer indices", "[3, 1]"),
    ("student.shape", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                       "num_key_value_heads": 3, "head_dim": 16}, "student.shape.num_key_value_heads", "a divisor of num_attention_heads (4)", "3"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last", "greater than or equal to 1", "0"),
    ("checkpoint.dir", "../elsewhere", "checkpoint.dir", "a relative path inside the run folder", "'../elsewhere'"),
    ("curriculum.1.name", "imitate", "curriculum[1].name", "a stage name used once", "'imitate'"),
    ("curriculum.2.until_step", 16, "curriculum[2].until_step", "more than the previous stage's (16)", "16"),
    ("curriculum.0.scale", {"lenght": 1.0}, "curriculum[0].scale.lenght", "'kl', 'ce',", "'lenght'"),
    ("losses", {"intermediate": 0.05, "intermediate_layers": []}, "losses.intermediate_layers", "[student_layer, teacher_layer] pairs since intermediate > 0", "[]"),
    ("resume.allow_changes", ["optim.lrr"], "resume.allow_changes[0]", "a key path of this configuration", "'optim.lrr'"),
    ("curriculum.2.on_policy", 1.5, "curriculum[2].on_policy", "less than or equal to 1", "1.5"),
    ("teacher", {"backend": "openai", "name": "t", "version": "v1", "mode": "generate", "source": {"format": "transformers", "path": "tok"},
                 "openai": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}},
     "curriculum[2].on_policy", "0 since teacher.backend is openai (the student's answers are scored by the teacher, and an API "
     "teacher cannot score given text)", "0.25"),
    ("curriculum.2.scale", {"kl": 0.0}, "curriculum[2].on_policy", "0 since the stage's kl weight is 0", "0.25"),
    ("on_policy.max_new_tokens", 0, "on_policy.max_new_tokens", "greater than or equal to 1", "0"),
    ("telemetry.prompts", 0, "telemetry.prompts", "greater than or equal to 1", "0"),
    ("telemetry.halt_threshold", 1.0, "telemetry.halt_threshold", "less than 1", "1.0"),
    ("telemetry.length_collapse", 0, "telemetry.length_collapse", "greater than 0", "0"),
    ("parallel.param_dtype", "bfloat16", "parallel.strategy", "fsdp since param_dtype or reduce_dtype is not float32", "'ddp'"),
    ("parallel.strategy", "zero3", "parallel.strategy", "'ddp' or 'fsdp'", "'zero3'"),
    ("data.workers", -1, "data.workers", "greater than or equal to 0", "-1"),
    ("telemetry.colapse", 0.4, "telemetry.colapse", "one of the keys early_halt, halt_threshold, length_collapse,", "unknown key 'colapse'"),
])
def test_bad_value_names_file_key_expected_found(tmp_path, key, value, where, expected, found):
    path = write(tmp_path, edited(reference_data(), key, value))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: at {where}: expected {expected}"), message
    assert message.endswith(f", found {found}"), message


def test_an_api_key_in_place_of_its_variable_name_is_refused_and_not_shown(tmp_path):
    key = "sk-live-0123456789abcdef"
    data = edited(reference_data(), "teacher", {"backend": "openai", "name": "t", "version": "v1", "mode": "generate",
                                                "source": {"format": "transformers", "path": "tok"},
                                                "openai": {"base_url": "https://api.example/v1", "model": "m", "api_key_env": key}})
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    assert "at teacher.openai.api_key_env: expected the name of an environment variable" in str(info.value)
    assert key not in "".join(traceback.format_exception(info.value))  # the message and what a traceback shows


def test_missing_required_key(tmp_path):
    data = reference_data()
    del data["optim"]["lr"]
    with pytest.raises(ConfigError, match=r"run.yaml: at optim.lr: expected a value \(required\), found no such key$"):
        load_config(write(tmp_path, data))


def test_yaml_problems_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: expected valid YAML, found .* at line \d+ column \d+"):
        load_config(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text(REFERENCE.read_text().replace("  kl: 1.0\n", "  kl: 1.0\n  kl: 2.0\n"))
    with pytest.raises(ConfigError, match=r"twice.yaml: expected valid YAML, found duplicate key 'kl' at line"):
        load_config(twice)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of sections \(losses, curriculum, .*found list"):
        load_config(listed)


def test_fingerprint_ignores_key_order_and_layout(tmp_path):
    data = reference_data()
    reordered = {section: (dict(reversed(list(value.items()))) if isinstance(value, dict) else value)
                 for section, value in reversed(list(data.items()))}
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump(reordered, default_flow_style=True, width=10_000))
    spaced = tmp_path / "spaced.yaml"
    spaced.write_text("\n\n" + yaml.safe_dump(data, indent=6, sort_keys=True).replace(": ", ":     "))
    fingerprints = {load_config(p).fingerprint() for p in (REFERENCE, dense, spaced)}
    assert len(fingerprints) == 1
    assert load_config(dense).canonical() == load_config(REFERENCE).canonical()


def test_fingerprint_changes_with_every_weight(tmp_path):
    base = load_config(REFERENCE).fingerprint()
    seen = {base}
    for name in LOSS_NAMES:
        data = reference_data()
        data["losses"][name] += 0.5
        seen.add(load_config(write(tmp_path, data, f"{name}.yaml")).fingerprint())
    data = reference_data()
    data["curriculum"][1]["scale"]["length"] = 0.25
    seen.add(load_config(write(tmp_path, data, "scale.yaml")).fingerprint())
    assert len(seen) == len(LOSS_NAMES) + 2


def test_diff_lists_exactly_the_changed_keys():
    old = load_config(REFERENCE).canonical()
    data = reference_data()
    data["losses"]["kl"] = 2.0
    data["optim"]["lr"] = 1e-4
    data["optim"]["betas"] = [0.9, 0.99]
    data["curriculum"][2]["until_step"] = 50
    new = DistillConfig.model_validate(data).canonical()
    changes = diff(old, new)
    assert [c.key for c in changes] == ["curriculum", "losses.kl", "optim.betas", "optim.lr"]
    assert changes[1] == Change("losses.kl", 1.0, 2.0)
    assert str(changes[1]) == "losses.kl: 1.0 -> 2.0"
    assert str(changes[2]) == "optim.betas: [0.9, 0.95] -> [0.9, 0.99]"
    assert changes[0].old[2]["until_step"] == 24 and changes[0].new[2]["until_step"] == 50
    assert diff(old, old) == []
    assert diff({"a": {"b": 1}}, {"a": {"c": 1}}) == [Change("a.b", 1, ABSENT), Change("a.c", ABSENT, 1)]
    assert str(Change("a.b", 1, ABSENT)) == "a.b: 1 -> (absent)"


def test_loss_weights_follow_the_curriculum():
    config = load_config(REFERENCE)
    length = [config.loss_weights(step)["length"] for step in (0, 7, 8, 15, 16, 23, 24, 1000)]
    assert length == [0.2, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]  # base 0.2 x 1.0, 0.5, then 0.0 (last stage holds)
    assert [config.loss_weights(step)["halt"] for step in (0, 8, 16)] == [0.0, 0.05, 0.1]
    assert config.loss_weights(0)["kl"] == config.losses.kl  # no scale: 1.0
    assert set(config.loss_weights(0)) == set(LOSS_NAMES)
    no_curriculum = DistillConfig.model_validate(dict(reference_data(), curriculum=[]))
    assert no_curriculum.loss_weights(5) == {name: getattr(config.losses, name) for name in LOSS_NAMES}


def test_stages_end_at_their_until_step_and_the_last_with_the_run(tmp_path):
    data = reference_data()  # stages until 8, 16, 24
    assert load_config(write(tmp_path, data)).stage_ends() == {8: "imitate", 16: "tools", 24: "latent"}
    assert load_config(write(tmp_path, edited(data, "optim.steps", 30))).stage_ends() == {8: "imitate", 16: "tools", 30: "latent"}
    assert load_config(write(tmp_path, edited(data, "optim.steps", 12))).stage_ends() == {8: "imitate", 12: "tools"}
    assert load_config(write(tmp_path, edited(data, "curriculum", []))).stage_ends() == {}


def test_configs_without_on_policy_steps_or_telemetry_keep_their_fingerprint(tmp_path):
    """The keys added for them are left out of the canonical form while off: earlier checkpoints still resume."""
    data = reference_data()
    del data["telemetry"], data["on_policy"], data["curriculum"][2]["on_policy"]
    plain = load_config(write(tmp_path, data, "plain.yaml"))
    assert not {"telemetry", "on_policy"} & set(plain.canonical())
    assert all("on_policy" not in stage for stage in plain.canonical()["curriculum"])
    explicit = edited(edited(reference_data(), "curriculum.2.on_policy", 0.0), "telemetry", None)
    assert load_config(write(tmp_path, explicit, "explicit.yaml")).fingerprint() == plain.fingerprint()
    assert load_config(write(tmp_path, edited(data, "telemetry", {}), "on.yaml")).fingerprint() != plain.fingerprint()
    assert load_config(write(tmp_path, edited(data, "on_policy", {"max_new_tokens": 8}), "bound.yaml")).fingerprint() != plain.fingerprint()


def test_lr_scale_warms_up_then_follows_the_schedule():
    optim = load_config(REFERENCE).optim  # 2 warmup steps of 24, cosine
    assert [optim.lr_scale(s) for s in range(2)] == [0.5, 1.0]
    assert optim.lr_scale(2) == 1.0 and optim.lr_scale(24) == pytest.approx(0.0, abs=1e-12)
    assert optim.model_copy(update={"schedule": "constant"}).lr_scale(30) == 1.0


def test_the_parallel_section_is_in_the_fingerprint_once_used_and_data_workers_never(tmp_path):
    """Where batches are collated does not change the run; how ranks share the student does (and its checkpoints' layout)."""
    data = reference_data()
    del data["parallel"], data["data"]["workers"]
    plain = load_config(write(tmp_path, data, "plain.yaml"))
    assert "parallel" not in plain.canonical() and "workers" not in plain.canonical()["data"]
    assert load_config(write(tmp_path, reference_data(), "explicit.yaml")).fingerprint() == plain.fingerprint()
    assert load_config(write(tmp_path, edited(data, "data.workers", 4), "workers.yaml")).fingerprint() == plain.fingerprint()
    fsdp = load_config(write(tmp_path, edited(data, "parallel", {"strategy": "fsdp"}), "fsdp.yaml"))
    assert fsdp.fingerprint() != plain.fingerprint() and fsdp.canonical()["parallel"]["strategy"] == "fsdp"
