"""moekit._checks: the shared argument checks (most are exercised through the public functions that call them;
these are the rules a plain membership or isinstance test would get wrong)."""

import pytest
import torch

from moekit._checks import check_choice, finite_extremes, triton_interpreting


def test_check_choice_accepts_its_choices():
    check_choice("bits", 4, (4, 8))
    check_choice("backend", "torch", ("auto", "torch", "triton"))


@pytest.mark.parametrize(("value", "shown"), [
    (8.0, "float 8.0"),     # 8.0 == 8: a membership test lets it through
    (True, "bool True"),    # True == 1
    (False, "bool False"),  # False == 0
    ("8", "str '8'"),
])
def test_check_choice_refuses_other_types_where_ints_are_expected(value, shown):
    with pytest.raises(TypeError, match=rf"bits: expected an int \(one of \[0, 1, 8\]\), got {shown}"):
        check_choice("bits", value, (0, 1, 8))


def test_check_choice_names_a_missing_choice():
    with pytest.raises(ValueError, match=r"bits: expected one of \[4, 8\], got 2"):
        check_choice("bits", 2, (4, 8))
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'torch'\], got 'cuda'"):
        check_choice("backend", "cuda", ("auto", "torch"))


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False),
                                       ("false", False), ("", False)])
def test_triton_interpreting_reads_the_variable_as_triton_does(monkeypatch, value, on):
    # Triton takes "true"/"on"/"yes" as well as "1": the inline-PTX paths must see the interpreter the same way.
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is on


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_extremes(dtype):
    t = torch.randn(7, 9, dtype=dtype)
    assert finite_extremes(t) and finite_extremes(t.t()) and finite_extremes(t[:0]) and finite_extremes(t[0, 0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[3, 4] = bad
        assert not finite_extremes(u) and not finite_extremes(u.t())
    # Cast: 7e4 overflows fp16 (max 65504; 65519 still rounds down to it, 65520 rounds to inf).
    big = torch.tensor([1.0, 7e4, -2.0], dtype=torch.float32)
    assert finite_extremes(big) and not finite_extremes(big, torch.float16)
    assert finite_extremes(torch.tensor([65519.0, -65519.0]), torch.float16)
    assert not finite_extremes(torch.tensor([-65520.0, 0.0]), torch.float16)


def test_finite_extremes_of_8_bit_floats_and_complex():
    # No aminmax kernel for 8-bit floats: they are checked in fp32 (exact); a complex tensor is refused.
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.tensor([1.0, -448.0, 0.5]).to(dt)
        assert finite_extremes(t) and finite_extremes(t, torch.bfloat16)
    assert not finite_extremes(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2))
    with pytest.raises(TypeError, match="expected a real tensor, got torch.complex64"):
        finite_extremes(torch.ones(2, dtype=torch.complex64))
