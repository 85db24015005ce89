"""The artifact fixtures. A user's ``conftest.py`` overrides any of them by name.

Each is session-scoped and lazy: a missing or broken artifact raises its ``ArtifactError``
inside the item that needs it, so that item fails with the message, not a setup traceback.
"""

from __future__ import annotations


import numpy as np
import pytest

from kdtrain.artifact_table import STUDENT_DISTILLED, coreml_package
from kdtrain.errors import ArtifactError
from pytest_kdcontracts.session import REPORT_PROPERTY, KDSession

SESSION_KEY = pytest.StashKey[KDSession]()


class _Unavailable:
    """Stands in for an artifacts folder that could not be opened; any use raises why."""

    def __init__(self, error: ArtifactError):
        self._error = error

    def __getattr__(self, name):
        raise self._error


class TokenizerSet:
    """name -> :class:`kdtrain.tokenizers.Tokenizer`, loaded on first use."""

    def __init__(self, artifacts):
        self._artifacts, self._loaded = artifacts, {}

    def __getitem__(self, name: str):
        from kdtrain.tokenizers.load import load_tokenizer

        if name not in self._loaded:
            self._loaded[name] = load_tokenizer(self._artifacts, name)
        return self._loaded[name]


@pytest.fixture(scope="session")
def kd_session(request) -> KDSession:
    session = request.config.stash.get(SESSION_KEY, None)
    if session is None:
        pytest.fail("kdcontracts fixtures need --kd-contracts DIR", pytrace=False)
    return session


@pytest.fixture(scope="session")
def kd_artifacts(kd_session):
    """The :class:`kdtrain.artifacts.ArtifactsFolder` the contracts verify."""
    from kdtrain.artifacts import ArtifactsFolder

    try:
        if kd_session.artifacts_dir is None:
            raise ArtifactError(kd_session.manifest_error or "no artifacts folder")
        return ArtifactsFolder.open(kd_session.artifacts_dir)
    except ArtifactError as exc:
        return _Unavailable(exc)


@pytest.fixture(scope="session")
def kd_tokenizers(kd_artifacts) -> TokenizerSet:
    """Tokenizers by contract name (teacher, student, runtime)."""
    return TokenizerSet(kd_artifacts)


@pytest.fixture(scope="session")
def kd_collator():
    """``collate(sequences, pad_id) -> Batch(input_ids, attention_mask)``: kdtrain's padding."""
    from kdtrain.data.collate import pad_batch

    return pad_batch


@pytest.fixture(scope="session")
def kd_chat_labeler():
    """``label(tokenizer, messages) -> (RenderedChat, ids, labels)``: kdtrain's loss masking."""
    from kdtrain.data.chat import tokenize_chat

    return tokenize_chat


class CoreMLPackages:
    """The converted mlpackages by length and precision; spec, MIL and backend session read once."""

    def __init__(self, artifacts):
        self._artifacts, self._io, self._mil, self._sessions = artifacts, {}, {}, {}

    def package(self, length: int, precision: str = "fp16"):
        return self._artifacts.path(coreml_package(length, precision))

    def io(self, length: int, precision: str = "fp16"):
        from kdtrain.coreml.inspect import functions_io

        if (length, precision) not in self._io:
            self._io[length, precision] = functions_io(self.package(length, precision))
        return self._io[length, precision]

    def mil(self, length: int, precision: str = "fp16"):
        from kdtrain.coreml.inspect import load_mil

        if (length, precision) not in self._mil:
            self._mil[length, precision] = load_mil(self.package(length, precision))
        return self._mil[length, precision]

    def session(self, length: int, precision: str = "fp16"):
        """A backend session (Core ML on macOS, the MIL executor elsewhere) for one package."""
        from kdtrain.runtime.backend import backend_name, open_package

        if (length, precision) not in self._sessions:
            program = self.mil(length, precision) if backend_name() == "mil-reference" else None  # parsed once
            self._sessions[length, precision] = PrefillOnce(open_package(self.package(length, precision), program=program))
        return self._sessions[length, precision]


@pytest.fixture(scope="session")
def kd_coreml(kd_artifacts) -> CoreMLPackages:
    """Converted mlpackages by length: ``.package(L)``, ``.io(L)`` (spec), ``.mil(L)`` (MIL program)."""
    return CoreMLPackages(kd_artifacts)


class PrefillOnce:
    """A session whose prefill from a fresh state runs once a session per inputs.

    Golden, prefill/decode, quantization A/B and finite-output items of one length start
    from the same prompts, and a prefill at L=4096 is the costliest call the contracts make.
    Prefill from a fresh state is a function of its inputs alone, so its outputs and the
    state it leaves are kept and handed out as copies (decode then writes its own copy). A
    runtime that cannot copy its state (Core ML's MLState) runs every call."""

    def __init__(self, session):
        self.session, self.backend, self._done = session, session.backend, {}

    def predict(self, function, inputs, state):
        if function != "prefill" or not self.session.is_fresh(state):
            return self.session.predict(function, inputs, state)
        key = tuple((name, np.asarray(value).tobytes()) for name, value in sorted(inputs.items()))
        if key not in self._done:
            outputs = self.session.predict(function, inputs, state)
            self._done[key] = (outputs, self.session.copy_state(state))
        outputs, saved = self._done[key]
        self.session.restore_state(state, saved)
        return {name: value.copy() for name, value in outputs.items()}

    def __getattr__(self, name):
        return getattr(self.session, name)


class Runtime:
    """Per length: the backend session and host, the PyTorch host, and the student itself."""

    def __init__(self, artifacts, coreml: CoreMLPackages, tokenizers: TokenizerSet):
        self._artifacts, self._coreml, self._tokenizers, self._by_length = artifacts, coreml, tokenizers, {}
        self._student = None

    @property
    def identity(self) -> tuple[dict, dict]:
        """What made the exported student: (the inputs that define it, the files whose bytes
        vary with the CPU). A distilled student is named by the distill stage's record; the
        initial one, built deterministically, by its checkpoint's hash."""
        student = self._artifacts.exported_student()
        if student == STUDENT_DISTILLED:
            settings = self._artifacts.manifest.stages[STUDENT_DISTILLED.stage].settings
            return {"student": student.name, **settings["identity"]}, settings.get("numerics", {})
        return {"student": student.name, student.name: "sha256:" + self._artifacts.entry(student).sha256}, {}

    @property
    def student(self):
        from kdtrain.student.model import StudentLM

        if self._student is None:
            self._student = StudentLM.from_pretrained(self._artifacts.path(self._artifacts.exported_student()))
        return self._student

    def for_length(self, length: int, host_api_version: str, segment: int | None = None):
        """``segment``: verify's S as the contract declares it (the PyTorch verify program's)."""
        from types import SimpleNamespace

        from kdtrain.runtime.backend import TorchSession
        from kdtrain.runtime.host import Host, check_host_api

        check_host_api(self._artifacts, host_api_version)
        if (length, segment) not in self._by_length:
            pad_id = self._tokenizers["student"].transformers.pad_token_id
            session = self._coreml.session(length)
            self._by_length[length, segment] = SimpleNamespace(
                backend=session.backend,
                session=session,
                host=Host(session, length, pad_id),
                torch_host=Host(PrefillOnce(TorchSession(self.student, length, segment)), length, pad_id),
                student=self.student,
            )
        return self._by_length[length, segment]


@pytest.fixture(scope="session")
def kd_runtime(kd_artifacts, kd_coreml, kd_tokenizers) -> Runtime:
    """Converted programs through the platform's backend, beside their PyTorch originals."""
    return Runtime(kd_artifacts, kd_coreml, kd_tokenizers)


@pytest.fixture
def kd_report(request):
    """``report(line)``: a measured figure for the kdcontracts section of the terminal summary.

    Carried in the item's report (``user_properties``), so it reaches the summary from
    pytest-xdist workers too."""
    return lambda line: request.node.user_properties.append((REPORT_PROPERTY, line))
