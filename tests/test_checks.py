"""The shared argument checks: scale values in chunks, finiteness, flags, numbers, devices, aliasing."""

import math

import pytest
import torch

from moe_backend import _checks
from moe_backend._checks import (
    check_bool,
    check_device,
    check_finite,
    check_real,
    check_scale_values,
    check_str,
    overlaps,
)


def test_first_bad_scale_is_found_beyond_the_first_chunk(monkeypatch):
    monkeypatch.setattr(_checks, "_SCALE_CHUNK", 7)
    s = torch.ones(4, 5, 3)
    s[2, 4, 1] = -1.0
    s[3, 0, 0] = float("nan")  # a later bad value: the first one is reported
    with pytest.raises(
        ValueError,
        match=r"^s: expected scales finite and > 0, got -1.0 at index \[2, 4, 1\] "
        r"\(shape \(4, 5, 3\)\)$",
    ):
        check_scale_values("s", s, allow_zero=False)


@pytest.mark.parametrize(
    "value, allow_zero, ok",
    [
        (0.0, True, True),
        (0.0, False, False),
        (-0.0, True, True),
        (1e-30, False, True),
        (float("nan"), True, False),
        (float("inf"), True, False),
        (-1e-30, True, False),
        (448.0, False, True),
    ],
)
def test_the_scale_rule_on_one_value(value, allow_zero, ok):
    for dtype in (torch.float32, torch.float8_e4m3fn):
        t = torch.full((3,), 1.0).to(dtype)
        t[1] = torch.tensor(value).to(dtype)
        if dtype == torch.float8_e4m3fn and (math.isinf(value) or 0 < abs(value) < 2**-9):
            continue  # not representable in e4m3 (inf becomes NaN, tiny values 0)
        if ok:
            assert check_scale_values("s", t, allow_zero=allow_zero) is t
        else:
            with pytest.raises(ValueError, match=r"^s: expected scales .* at index \[1\]"):
                check_scale_values("s", t, allow_zero=allow_zero)


def test_empty_scales_pass():
    assert check_scale_values("s", torch.zeros(0, 3), allow_zero=False).shape == (0, 3)


def test_check_finite_names_the_first_bad_index():
    t = torch.zeros(2, 3)
    t[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^t: expected finite values, got inf at index \[1, 2\]$"):
        check_finite("t", t)
    check_finite("t", torch.zeros(0, 3))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: check_bool("flag", "no"), TypeError, "flag: expected a bool, got str 'no'"),
        (lambda: check_bool("flag", 0), TypeError, "flag: expected a bool, got int 0"),
        (lambda: check_str("name", 1), TypeError, "name: expected a str, got int 1"),
        (lambda: check_real("x", True), TypeError, "x: expected a float, got bool"),
        (lambda: check_real("x", "1.0"), TypeError, "x: expected a float, got str"),
        (lambda: check_real("x", float("nan")), ValueError, "x: expected a finite float, got nan"),
        (lambda: check_real("x", 0, positive=True), ValueError, "x: expected a finite positive float, got 0.0"),
        (lambda: check_device("d", 3), TypeError, "d: expected a torch.device or str"),
        (lambda: check_device("d", "gpu"), ValueError, "d: expected a device such as"),
    ],
)
def test_scalar_checks_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_check_real_and_device_return_normalised_values():
    assert check_real("x", 3) == 3.0 and isinstance(check_real("x", 3), float)
    assert check_device("d", "cpu") == torch.device("cpu")


def test_overlaps():
    buf = torch.zeros(6, 4)
    assert overlaps(buf[:3], buf[2:5]) and not overlaps(buf[:2], buf[2:])
    assert overlaps(buf[:, 1], buf[3]) and not overlaps(buf[:, 0][:2], buf[2:])
    assert not overlaps(buf[:0], buf) and not overlaps(buf, torch.zeros(6, 4))
