"""INT8 packages from FP16 ones, with coremltools' own compression API and per-op configs.

``linear_quantize_weights`` refuses multifunction models, so each function is lifted out of
the FP16 package (its spec and MIL function, same weight file), quantized, and the functions
are recombined into one multifunction package, as the FP16 one.
"""

from __future__ import annotations

from pathlib import Path

from kdcontracts.models.quant import Quantize, Setting
from kdtrain.coreml.convert import save_multifunction
from kdtrain.quant.recipe import const_name


def single_function(package: Path, function: str):
    """One function of a multifunction package as a single-function MLModel (not loaded)."""
    import coremltools as ct
    from coremltools.proto import Model_pb2

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    new = Model_pb2.Model()
    new.CopyFrom(spec)
    described = next(f for f in spec.description.functions if f.name == function)
    new.description.ClearField("functions")
    new.description.defaultFunctionName = ""
    new.description.input.extend(described.input)
    new.description.output.extend(described.output)
    new.description.state.extend(described.state)
    body = type(spec.mlProgram.functions[function])()
    body.CopyFrom(spec.mlProgram.functions[function])
    for name in list(new.mlProgram.functions.keys()):
        del new.mlProgram.functions[name]
    new.mlProgram.functions["main"].CopyFrom(body)
    return ct.models.MLModel(new, weights_dir=model.weights_dir, skip_model_load=True)


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


def quantize_package(fp16: Path, out: Path, settings: dict[str, Setting], functions=("prefill", "decode")) -> None:
    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights

    config = OptimizationConfig(op_name_configs=op_configs(settings))
    models = {fn: linear_quantize_weights(single_function(fp16, fn), config=config) for fn in functions}
    save_multifunction(models, out, default=functions[0])
