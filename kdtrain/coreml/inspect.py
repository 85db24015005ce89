"""Read a saved mlpackage on any OS: its spec (IO, states, functions) and its MIL program."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdtrain.errors import ArtifactError

# Core ML's ArrayDataType enum names -> the contract's dtype names.
_ARRAY_DTYPES = {"INT32": "int32", "FLOAT16": "float16", "FLOAT32": "float32", "DOUBLE": "float64"}


@dataclass(frozen=True)
class TensorIO:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class FunctionIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    states: tuple[TensorIO, ...]


def load_model(path: Path):
    import coremltools as ct

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ArtifactError(f"{path}: expected an mlpackage (with Manifest.json), found none")
    try:
        return ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as exc:  # protobuf and coremltools raise many types for a damaged package
        raise ArtifactError(f"{path}: expected a readable mlpackage, found: {exc}") from None


def _tensor(feature, array_field: str) -> TensorIO:
    from coremltools.proto import FeatureTypes_pb2

    array = getattr(feature.type, array_field)
    if array_field == "stateType":
        array = array.arrayType
    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    return TensorIO(feature.name, tuple(int(d) for d in array.shape), _ARRAY_DTYPES.get(dtype, dtype.lower()))


def functions_io(path: Path) -> dict[str, FunctionIO]:
    """Function name -> its IO, for multifunction and single-function ("main") packages."""
    spec = load_model(path).get_spec()
    desc = spec.description
    described = list(desc.functions) or [desc]
    names = [f.name for f in desc.functions] or ["main"]
    return {
        name: FunctionIO(
            tuple(_tensor(f, "multiArrayType") for f in d.input),
            tuple(_tensor(f, "multiArrayType") for f in d.output),
            tuple(_tensor(f, "stateType") for f in d.state),
        )
        for name, d in zip(names, described)
    }


def load_mil(path: Path):
    """The MIL program of a saved mlpackage (all functions), read back without a runtime."""
    from coremltools.converters.mil.frontend.milproto.load import load

    model = load_model(path)
    spec = model.get_spec()
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


def dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)
