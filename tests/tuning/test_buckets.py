"""Hybrid token buckets: exact lists, the three published defects, and properties."""

import pytest
from hypothesis import given, settings, strategies as st

from moe_backend.tuning.buckets import buckets, map_to_bucket, map_to_bucket_uncapped

# The hybrid sequence written out phase by phase, independently of the implementation.
HYBRID = sorted(
    [2**i for i in range(9)]  # 1 .. 256
    + list(range(512, 2049, 256))  # 512 .. 2048
    + list(range(2560, 4097, 512))  # 2560 .. 4096
    + [2**i for i in range(13, 40)]  # 8192 ..
)

MAXES = st.integers(1, 65536)
SETTINGS = settings(max_examples=200, deadline=None)


def oracle_buckets(max_tokens, min_tokens=1):
    return sorted({h for h in HYBRID if min_tokens <= h <= max_tokens} | {max_tokens})


def oracle_uncapped(max_tokens, min_tokens=1):
    return oracle_buckets(max_tokens, min_tokens) + [h for h in HYBRID if h > max_tokens]


@st.composite
def max_min(draw):
    max_tokens = draw(MAXES)
    return max_tokens, draw(st.integers(1, max_tokens))


# -- exact lists ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "max_tokens, expected",
    [
        (1, [1]),
        (2, [1, 2]),
        (3, [1, 2, 3]),
        (100, [1, 2, 4, 8, 16, 32, 64, 100]),
        (256, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
        (300, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]),
        (2048, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]),
        (4096, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096]),
        (
            10000,
            [
                1,
                2,
                4,
                8,
                16,
                32,
                64,
                128,
                256,
                512,
                768,
                1024,
                1280,
                1536,
                1792,
                2048,
                2560,
                3072,
                3584,
                4096,
                8192,
                10000,
            ],
        ),
        (
            65536,
            [
                1,
                2,
                4,
                8,
                16,
                32,
                64,
                128,
                256,
                512,
                768,
                1024,
                1280,
                1536,
                1792,
                2048,
                2560,
                3072,
                3584,
                4096,
                8192,
                16384,
                32768,
                65536,
            ],
        ),
    ],
)
def test_exact_lists(max_tokens, expected):
    assert buckets(max_tokens) == expected


@pytest.mark.parametrize(
    "max_tokens, min_tokens, expected",
    [
        (100, 10, [16, 32, 64, 100]),  # not 10, 20, 40, 80 (defect 1)
        (100, 64, [64, 100]),
        (100, 65, [100]),
        (100, 100, [100]),
        (3000, 300, [512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3000]),
    ],
)
def test_min_restricts_the_full_list(max_tokens, min_tokens, expected):
    assert buckets(max_tokens, min_tokens) == expected
    assert map_to_bucket(min_tokens, max_tokens, min_tokens) == expected[0]


@pytest.mark.parametrize(
    "x, max_tokens, min_tokens, expected",
    [
        (0, 100, 1, 1),
        (1, 100, 1, 1),
        (3, 100, 1, 4),
        (65, 100, 1, 100),  # not next_power_of_2 = 128 (defect 2)
        (100, 100, 1, 100),
        (10, 100, 10, 16),
        (5, 100, 10, 16),  # below min: the first bucket
        (257, 300, 1, 300),
        (257, 4096, 1, 512),
        (2049, 4096, 1, 2560),
        (4097, 65536, 1, 8192),
        (20000, 32768, 1, 32768),  # no constant 8192 cap (defect 3)
        (40000, 65536, 1, 65536),
        (101, 100, 1, 100),  # above max: capped at the engine's max
    ],
)
def test_map_exact(x, max_tokens, min_tokens, expected):
    assert map_to_bucket(x, max_tokens, min_tokens) == expected


@pytest.mark.parametrize(
    "x, max_tokens, expected",
    [
        (101, 100, 128),
        (129, 100, 256),
        (3000, 2048, 3072),
        (5000, 4096, 8192),
        (9000, 8192, 16384),
        (9000, 10000, 10000),
        (100000, 65536, 131072),
    ],
)
def test_map_uncapped_exact(x, max_tokens, expected):
    assert map_to_bucket_uncapped(x, max_tokens) == expected


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: buckets(0), ValueError, "max_num_tokens"),
        (lambda: buckets(8.0), TypeError, "max_num_tokens"),
        (lambda: buckets(True), TypeError, "max_num_tokens"),
        (lambda: buckets(8, 0), ValueError, "min_num_tokens"),
        (lambda: buckets(8, 9), ValueError, "min_num_tokens"),
        (lambda: buckets(8, "1"), TypeError, "min_num_tokens"),
        (lambda: map_to_bucket(-1, 8), ValueError, "num_tokens"),
        (lambda: map_to_bucket(2.0, 8), TypeError, "num_tokens"),
        (lambda: map_to_bucket(2, 0), ValueError, "max_num_tokens"),
        (lambda: map_to_bucket_uncapped(-1, 8), ValueError, "num_tokens"),
        (lambda: map_to_bucket_uncapped(None, 8), TypeError, "num_tokens"),
        (lambda: map_to_bucket_uncapped(9, 8, 9), ValueError, "min_num_tokens"),
    ],
)
def test_validation_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# -- properties -------------------------------------------------------------------------------
@SETTINGS
@given(max_min())
def test_buckets_match_the_phase_definition(mm):
    max_tokens, min_tokens = mm
    got = buckets(max_tokens, min_tokens)
    assert got == oracle_buckets(max_tokens, min_tokens)
    assert got[-1] == max_tokens
    assert got == [b for b in buckets(max_tokens) if b >= min_tokens]


@SETTINGS
@given(max_min(), st.data())
def test_map_is_a_bucket_at_least_x_and_monotonic(mm, data):
    max_tokens, min_tokens = mm
    members = set(buckets(max_tokens, min_tokens))
    x, y = sorted(data.draw(st.lists(st.integers(0, max_tokens), min_size=2, max_size=2)))
    mx, my = map_to_bucket(x, max_tokens, min_tokens), map_to_bucket(y, max_tokens, min_tokens)
    assert mx in members and my in members
    assert mx >= x and my >= y
    assert mx <= my
    assert mx == min(b for b in members if b >= x)  # the smallest bucket that fits


@SETTINGS
@given(max_min(), st.data())
def test_uncapped_continues_the_list_beyond_max(mm, data):
    max_tokens, min_tokens = mm
    extended = oracle_uncapped(max_tokens, min_tokens)
    x, y = sorted(data.draw(st.lists(st.integers(0, 8 * max_tokens), min_size=2, max_size=2)))
    ux = map_to_bucket_uncapped(x, max_tokens, min_tokens)
    uy = map_to_bucket_uncapped(y, max_tokens, min_tokens)
    assert ux == min(b for b in extended if b >= x)
    assert ux >= x and ux <= uy
    if x <= max_tokens:
        assert ux == map_to_bucket(x, max_tokens, min_tokens)
    else:
        assert ux > max_tokens and map_to_bucket(x, max_tokens, min_tokens) == max_tokens
