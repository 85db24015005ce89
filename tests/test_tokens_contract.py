"""tokens.json contracts: pass on the reference artifacts, fail on each planted fault with a
message naming the token, the tokenizer, the expected and the found value."""

from __future__ import annotations

import textwrap

RUNTIME = "tokenizers/runtime/tokenizer.json"
STUDENT = "tokenizers/student/tokenizer.json"


def _added(data: dict, text: str) -> dict:
    return next(t for t in data["added_tokens"] if t["content"] == text)


def test_reference_artifacts_pass_every_contract(workspace):
    first = workspace.run("--snapshot-update")  # golden/ starts empty in a fresh workspace
    first.assert_outcomes(passed=219, xfailed=4)
    first.stdout.fnmatch_lines(["*9 snapshots generated*"])  # 6 golden vectors, 3 ablation baselines
    result = workspace.run()
    result.assert_outcomes(passed=219, xfailed=4)
    result.stdout.fnmatch_lines([
        "kdcontracts: contracts *contracts",
        "kdcontracts: artifacts *artifacts (from manifest.json)",
        "kdcontracts: backend mil-reference (MIL reference executor*",
        "kdcontracts: tokenizer runtime  sha256:*",
        "*9 snapshots passed*",
        "*= kdcontracts =*",
        "passed  ablations.yaml::baseline *3 passed",
        "passed  ablations.yaml::protocol *1 passed",
        "passed  coreml_contract.json::ane_residency *6 passed",
        "passed  coreml_contract.json::golden *6 passed",
        "passed  coreml_contract.json::host_api_version *1 passed",
        "passed  coreml_contract.json::io *6 passed",
        "passed  coreml_contract.json::prefill_decode *2 passed",
        "passed  coreml_contract.json::verify_decode *2 passed",
        "passed  distill_data.yaml::corruption_rate *1 passed",
        "passed  distill_data.yaml::teacher_targets *4 passed",
        "passed  export_lint.yaml::lint *6 passed",
        "passed  gates.yaml::curriculum *1 passed",
        "passed  gates.yaml::scenario *6 passed",
        "passed  gates.yaml::verdict *1 passed",
        "xfailed judge.yaml::agreement *1 xfailed",  # judge.yaml's known_unfit: the 135M reference judge
        "xfailed judge.yaml::consistency *1 xfailed",
        "passed  judge.yaml::length_bias *1 passed",
        "xfailed judge.yaml::position_bias *1 xfailed",
        "passed  judge.yaml::probes *1 passed",
        "xfailed judge.yaml::rank_correlation *1 xfailed",
        "passed  precision_islands.yaml::islands *6 passed",
        "passed  quant_recipe.yaml::ab *2 passed",
        "passed  quant_recipe.yaml::conformance *6 passed",
        "passed  quant_recipe.yaml::finite *2 passed",
        "passed  quant_recipe.yaml::recipe_coverage *1 passed",
        "passed  runtime_budget.yaml::kv_state *2 passed",
        "passed  runtime_budget.yaml::pool *1 passed",
        "passed  runtime_budget.yaml::runtime_config *1 passed",
        "passed  runtime_budget.yaml::table *1 passed",
        "passed  runtime_budget.yaml::weights *4 passed",
        "passed  speculative.yaml::acceptance *1 passed",
        "passed  speculative.yaml::exact *6 passed",
        "passed  speculative.yaml::segments *1 passed",
        "passed  speculative.yaml::self *2 passed",
        "passed  tool_registry.json::corpus_calls *8 passed",
        "quant A/B L=64: INT8/FP16 size 0.5*",
        "4x xfailed: known unfit: *",
        "contracts: 219 passed, 4 xfailed",
    ])


def test_runtime_id_changed_fails_special_id_and_same_ids(workspace):
    def swap(data):  # the order of added_tokens decides their ids when tokenizers loads the file
        tokens = data["added_tokens"]
        i = tokens.index(_added(data, "<think>"))
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        tokens[i]["id"], tokens[i + 1]["id"] = 49152, 49153

    workspace.edit_json(RUNTIME, swap)
    result = workspace.run("-k", "runtime and think")
    result.stdout.fnmatch_lines([
        "*tokens.json::special_id[[]runtime-<think>[]]*",
        "*special token '<think>' in tokenizer 'runtime'*",
        "*expected: id 49152",
        "*found:    id 49153",
    ])
    failed = workspace.failed(result)
    assert {"special_id[runtime-<think>]", "special_id[runtime-</think>]", "same_ids[student-runtime-think_then_answer]"} <= failed
    assert "single_token[runtime-<think>]" in failed  # the contract's id no longer encodes <think>


def test_tag_made_splittable_fails_single_token(workspace):
    def demote(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<tool_call>"]

    workspace.edit_json(STUDENT, demote)
    result = workspace.run("-k", "single_token and student")
    result.stdout.fnmatch_lines([
        "*single_token[[]student-<tool_call>[]]*",
        "*'<tool_call>' alone in tokenizer 'student'*",
        "*expected: one token [[]49154[]]",
        "*found:    5 token(s) [[]44 '<', 19324 'tool', 79 '_', 4350 'call', 46 '>'[]]",
    ])
    # Later tags shift down one id when an earlier one is removed: they fail too, on their ids.
    assert workspace.failed(result) == {f"single_token[student-{t}]" for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")}


def test_fingerprint_drift_fails_but_reformatting_does_not(workspace):
    path = workspace.artifacts / RUNTIME
    import json

    workspace.write(RUNTIME, json.dumps(json.loads(path.read_text()), indent=7, sort_keys=True))
    workspace.run("-k", "fingerprint").assert_outcomes(passed=3)

    workspace.write("tokenizers/student/chat_template.jinja", "{{ messages }}")
    result = workspace.run("-k", "fingerprint")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*fingerprint of tokenizer 'student'*",
        "*expected: sha256:3c41d0*",
        "*found:    sha256:*",
        "*meaning changed*",
    ])


def test_collator_that_masks_eos_when_pad_is_eos_fails(workspace):
    workspace.pytester.makeconftest(textwrap.dedent("""
        import pytest, torch
        from kdtrain.data.collate import Batch

        @pytest.fixture(scope="session")
        def kd_collator():
            def naive(sequences, pad_id):  # the classic bug: mask = ids != pad
                n = max(map(len, sequences))
                ids = torch.tensor([list(s) + [pad_id] * (n - len(s)) for s in sequences])
                return Batch(ids, (ids != pad_id).long())
            return naive
    """))
    result = workspace.run("-k", "padding_mask and student")
    result.stdout.fnmatch_lines([
        "*padding_mask[[]student-<|im_end|>[]]*",
        "*padding mask of '<|im_end|>' (id 2, roles [[]'eos', 'pad'[]]) with PAD id 2 in tokenizer 'student'*",
        "*'<|im_end|>' masked at positions [[]1[]]",
        "*PAD and EOS share an id*",
    ])
    result.assert_outcomes(failed=1, passed=8)


def test_label_masker_that_hides_tool_json_fails_loss_mask(workspace):
    workspace.pytester.makeconftest(textwrap.dedent("""
        import re, pytest
        from kdtrain.data.chat import IGNORE_INDEX, tokenize_chat

        @pytest.fixture(scope="session")
        def kd_chat_labeler():
            def hide_tool_calls(tokenizer, messages):
                rendered, ids, labels = tokenize_chat(tokenizer, messages)
                offsets = tokenizer.encode(rendered.text).offsets
                calls = [m.span() for m in re.finditer(r"<tool_call>.*?</tool_call>", rendered.text, re.S)]
                labels = [IGNORE_INDEX if any(s <= a < e for s, e in calls) else l for l, (a, _) in zip(labels, offsets)]
                return rendered, ids, labels
            return hide_tool_calls
    """))
    result = workspace.run("-k", "loss_mask and student")
    result.stdout.fnmatch_lines(["*loss mask of example 'single_tool_call' in tokenizer 'student'*", "*found:    token * masked (ignore index)*"])
    result.assert_outcomes(failed=2, passed=4)  # plain_answer has no tool call


def test_audit_log_that_disagrees_with_the_tokenizers_fails(workspace):
    def tamper(data):
        data["added_tokens"][0]["id"] = 12
        data["to"]["vocab_sha256"] = "sha256:" + "0" * 64

    workspace.edit_json("migration/audit.json", tamper)
    result = workspace.run("-k", "migration_audit")
    result.stdout.fnmatch_lines(["*migration audit log entry for '<think>'*", "*found:    log: 12, tokenizer: 49152*"])
    result.assert_outcomes(failed=2, passed=7)


def test_a_contract_without_bos_holds_the_tokenizers_to_having_none(workspace):
    """Qwen's tokenizers have no BOS: tokens.json then gives the role to no token, and a tokenizer
    that does have one (here the reference's <|im_start|>) fails its BOS item."""
    def no_bos(doc):
        assert doc["special_tokens"][0]["roles"] == ["bos"]
        del doc["special_tokens"][0]

    workspace.edit_contract("tokens.json", no_bos)
    result = workspace.run("-k", "role_id")
    assert workspace.failed(result) == {"role_id[teacher-bos]", "role_id[student-bos]"}
    result.stdout.fnmatch_lines(["*BOS of tokenizer 'teacher'*", "*expected: no BOS token", "*found:    id 1 ('<|im_start|>')"])
