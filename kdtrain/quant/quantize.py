"""INT8 packages from FP16 ones, with coremltools' own quantization pass and per-op configs.

The public ``linear_quantize_weights`` refuses multifunction models, and going round it (lift
each function out, quantize it, recombine with ``save_multifunction``) loads and exports every
function three times and reruns the whole conversion pass pipeline on each: about 30 s per
length on two cores. Here the package's MIL program (every function) is read once, the same
pass that API applies (``coremltools.optimize.coreml._quantization_passes.linear_quantize_weights``)
replaces its ``const`` weights, the quantized weights are shared across functions as
``save_multifunction`` does (``const_deduplication``), and the program is exported once: about
8 s. The INT8 program is the FP16 program op for op, with its weights compressed (checked by
hand on the reference packages, and the A/B figures were unchanged; no test pins the op
equality yet); ``tests/test_quant_contracts.py`` pins the recipe conformance.
"""

from __future__ import annotations

from pathlib import Path

from kdcontracts.models.quant import Quantize, Setting
from kdtrain.coreml.convert import save_package, scratch
from kdtrain.quant.recipe import const_name


def op_configs(settings: dict[str, Setting]) -> dict:
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    configs = {}
    for module, setting in settings.items():
        if isinstance(setting, Quantize):
            configs[const_name(module)] = OpLinearQuantizerConfig(
                mode="linear_symmetric" if setting.symmetric else "linear",
                dtype=setting.dtype,
                granularity=setting.granularity,
                weight_threshold=0,
            )
        else:
            configs[const_name(module)] = None  # explicitly not compressed
    return configs


def quantize_package(fp16: Path, out: Path, settings: dict[str, Setting]) -> None:
    """Write ``out`` (atomically): ``fp16`` with its weights quantized as ``settings`` say."""
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize.coreml import OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    from kdtrain.coreml.inspect import load_mil, load_model

    spec = load_model(fp16).get_spec()
    program = load_mil(fp16)
    linear_quantize_weights(config=OptimizationConfig(op_name_configs=op_configs(settings))).apply(program)
    PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(program)
    program.default_function_name = spec.description.defaultFunctionName
    program.skip_all_passes = True  # the FP16 program was optimised at conversion; keep it op for op
    program.export_as_multifunction = True
    with scratch(out):
        model = mil_convert(program, convert_to="mlprogram", convert_from="milinternal", specification_version=spec.specificationVersion,
                            compute_units=ct.ComputeUnit.CPU_ONLY, model_description=spec.description, skip_model_load=True)
        save_package(model, out)
