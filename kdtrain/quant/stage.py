"""``kdtrain quantize``: the recipe applied to every FP16 package, calibration recorded, A/B measured.

Writes ``coreml/int8/student-L<L>.mlpackage``, ``quant/calibration.json`` (the set and its
composition), ``quant/activation_stats.json`` (+ PNG), ``quant/ab.json`` (+ a size/accuracy and
latency PNG). The A/B records accuracy, size, the student's weight bytes in each program, and
latency and memory measured here (TTFT, decode tokens/s, prefill peak on the MIL executor):
``quant_recipe.yaml::ab[L]`` judges latency from this record, so the test run times nothing.
"""

from __future__ import annotations

import json

from tqdm import tqdm

from kdcontracts.models.quant import Recipe
from kdtrain import atomic
from kdtrain.artifact_table import (QUANT_AB, QUANT_ACTIVATION_PLOT, QUANT_ACTIVATION_STATS, QUANT_CALIBRATION,
                                    QUANT_SIZE_ACCURACY_PLOT, coreml_package)
from kdtrain.quant.ab import measure_ab, package_size, weight_bytes
from kdtrain.quant.calibration import activation_stats, build_calibration_set
from kdtrain.quant.quantize import quantize_package
from kdtrain.quant.recipe import checkpoint_modules
from kdtrain.stage import StageContext


def ab_prompts(calibration: list[dict]) -> list[list[int]]:
    """One prompt of each kind (tool use, code, long context); the host truncates to fit L."""
    first = {}
    for sample in calibration:
        first.setdefault(sample["kind"], sample["ids"])
    return [first[kind] for kind in sorted(first)]


def student_modules(folder) -> list[str]:
    from safetensors import safe_open

    checkpoint = folder.path(folder.exported_student())
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    return checkpoint_modules(names, bool(config.get("tie_word_embeddings")))


def _plots(folder, stats: dict, results: list) -> None:
    from kdtrain.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    names = sorted(stats)
    ax.bar(range(len(names)), [stats[n]["p999_abs"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("p99.9 |activation|")
    ax.set_title("Activation range per module on the calibration set")
    save_png(fig, folder.root / QUANT_ACTIVATION_PLOT.path)
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        ax.scatter([r.size_fp16 / 1e6, r.size_int8 / 1e6], [1.0, r.cosine_min], label=f"L={r.length}")
        ax.plot([r.size_fp16 / 1e6, r.size_int8 / 1e6], [1.0, r.cosine_min], alpha=0.4)
    ax.set_xlabel("package size (MB)")
    ax.set_ylabel("worst-step logit cosine vs FP16")
    ax.set_title("INT8 vs FP16: size / accuracy")
    ax.legend()
    timed = [r for r in results if r.ttft_ratio is not None]
    lengths = [r.length for r in timed]
    for name, values in (("FP16", [r.ttft_fp16_s for r in timed]), ("INT8", [r.ttft_int8_s for r in timed])):
        lat.plot(lengths, [v * 1e3 for v in values], marker="o", label=f"{name} TTFT")
    lat.set_xscale("log", base=2)
    if lengths:
        lat.set_xticks(lengths, [str(n) for n in lengths])
    lat.set_xlabel("context length L")
    lat.set_ylabel("TTFT (ms)")
    lat.set_title(f"latency [{results[0].backend if results else '?'}]")
    decode = lat.twinx()
    for name, values in (("FP16", [r.decode_fp16_tokens_per_s for r in timed]), ("INT8", [r.decode_int8_tokens_per_s for r in timed])):
        if all(v is not None for v in values):
            decode.plot(lengths, values, linestyle="--", marker="s", alpha=0.6, label=f"{name} decode")
    decode.set_ylabel("decode tokens/s (dashed)")
    handles = lat.get_legend_handles_labels()[0] + decode.get_legend_handles_labels()[0]
    lat.legend(handles, [h.get_label() for h in handles], fontsize=7)
    save_png(fig, folder.root / QUANT_SIZE_ACCURACY_PLOT.path)
    folder.record(QUANT_ACTIVATION_PLOT)
    folder.record(QUANT_SIZE_ACCURACY_PLOT)


def stage_quantize(ctx: StageContext) -> None:
    from kdtrain.coreml.inspect import load_mil
    from kdtrain.runtime.backend import open_package
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer

    folder = ctx.folder
    recipe: Recipe = ctx.contract("quant_recipe.yaml").recipe
    coreml = ctx.contract("coreml_contract.json")
    settings = recipe.resolve(student_modules(folder))
    tokenizer = load_tokenizer(folder, "student")
    calibration = build_calibration_set(recipe.calibration["samples"], recipe.calibration["seed"], tokenizer, max(coreml.lengths))
    atomic.write_json(folder.root / QUANT_CALIBRATION.path, {
        "composition": recipe.calibration["samples"], "seed": recipe.calibration["seed"],
        "tokens": {s["kind"]: len(s["ids"]) for s in calibration}, "samples": calibration,
    })
    folder.record(QUANT_CALIBRATION)
    student = StudentLM.from_pretrained(folder.path(folder.exported_student()))
    stats = activation_stats(student, calibration)
    atomic.write_json(folder.root / QUANT_ACTIVATION_STATS.path, stats)
    folder.record(QUANT_ACTIVATION_STATS)
    pad_id = tokenizer.transformers.pad_token_id
    results = []
    for length in tqdm(coreml.lengths, desc="quantize", unit="length"):
        fp16, int8 = folder.path(coreml_package(length)), coreml_package(length, "int8")
        quantize_package(fp16, folder.root / int8.path, settings)
        folder.record(int8)
        int8_path = folder.path(int8)
        prompts = ab_prompts(calibration)
        programs = load_mil(fp16), load_mil(int8_path)  # read once: weight bytes, and the MIL executor runs them
        results.append(measure_ab(open_package(fp16, program=programs[0]), open_package(int8_path, program=programs[1]), prompts,
                                  recipe.ab["decode_steps"], length, pad_id, (package_size(fp16), package_size(int8_path)),
                                  weights=(weight_bytes(programs[0]), weight_bytes(programs[1])), timed=True))
        print(f"quantize: {results[-1].summary()}")
    atomic.write_json(folder.root / QUANT_AB.path, [r.to_json() for r in results])
    folder.record(QUANT_AB)
    _plots(folder, stats, results)
    folder.record_stage("quantize", {"settings": {m: str(s) for m, s in settings.items()}})
