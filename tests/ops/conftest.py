"""Fixtures shared by the Pallas kernel tests."""

import pytest


@pytest.fixture
def triton_modules(monkeypatch):
    """Collects the Triton IR of every kernel lowered, after running MLIR's verifier on it: lowering
    from the CPU does not verify the module, and a module that fails verification (operand types an
    op does not accept) only fails on a GPU, when XLA parses it. Private jax API: skip if it moved."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    lower = getattr(registration.lowering, "lower_jaxpr_to_triton_module", None)
    if lower is None:
        pytest.skip("jax moved the Triton lowering entry point")
    modules = []

    def capture(*a, **kw):
        result = lower(*a, **kw)
        op = result.module.operation
        try:
            op.verify()
        except Exception as e:  # the MLIR bindings raise their own error type
            raise AssertionError(f"a Triton module fails MLIR verification: {e}") from None
        modules.append(op.get_asm())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    return modules
