"""Buffer pool: shared views, growth once, no growth inside a capture."""

import pytest
import torch

from moe_backend.runtime import BufferGrowthInCaptureError, BufferPool

CPU = torch.device("cpu")


def test_views_share_storage_per_key_and_roles_do_not_alias():
    pool = BufferPool(max_rows=64)
    a = pool.get(10, 32, torch.float32, CPU, "acc")
    b = pool.get(3, 32, torch.float32, CPU, "acc")
    assert a.shape == (10, 32) and b.shape == (3, 32)
    assert a.data_ptr() == b.data_ptr()
    c = pool.get(10, 32, torch.float32, CPU, "intermediate")
    assert c.data_ptr() != a.data_ptr()
    d = pool.get(10, 32, torch.bfloat16, CPU, "acc")
    assert d.data_ptr() != a.data_ptr()
    assert pool.nbytes() == 64 * 32 * 4 * 2 + 64 * 32 * 2


def test_grows_once_to_the_new_maximum():
    pool = BufferPool(max_rows=8)
    first = pool.get(8, 4, torch.float32, CPU, "x")
    big = pool.get(20, 4, torch.float32, CPU, "x")
    assert big.shape == (20, 4) and big.data_ptr() != first.data_ptr()
    again = pool.get(20, 4, torch.float32, CPU, "x")
    small = pool.get(5, 4, torch.float32, CPU, "x")
    assert again.data_ptr() == big.data_ptr() == small.data_ptr()


def test_reserve_raises_capacity_of_new_buffers_only_upwards():
    pool = BufferPool()
    pool.reserve(100)
    pool.reserve(50)
    assert pool.max_rows == 100
    assert pool.get(1, 2, torch.float32, CPU, "r")._base.shape[0] == 100


def test_zero_rows_and_clear():
    pool = BufferPool(4)
    assert pool.get(0, 8, torch.float32, CPU, "z").shape == (0, 8)
    pool.clear()
    assert pool.nbytes() == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.get(-1, 4, torch.float32, CPU, "x"), "rows: expected an int >= 0"),
        (lambda p: p.get(1, 0, torch.float32, CPU, "x"), "width: expected an int >= 1"),
        (lambda p: p.reserve(-3), "max_rows: expected an int >= 0"),
        (lambda p: BufferPool(max_rows=1.5), "max_rows: expected an int"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(BufferPool())


@pytest.mark.gpu
def test_growth_inside_capture_is_an_error_that_says_so():
    pool = BufferPool(max_rows=16)
    dev = torch.device("cuda")
    pool.get(16, 128, torch.float32, dev, "acc")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(BufferGrowthInCaptureError, match="while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            pool.get(17, 128, torch.float32, dev, "acc")
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        view = pool.get(16, 128, torch.float32, dev, "acc")  # within capacity: fine
        view.zero_()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dtype": "bfloat16"}, TypeError, "dtype: expected a torch.dtype, got str"),
        ({"device": 0}, TypeError, "device: expected a torch.device or str, got int"),
        ({"device": "tpu9"}, ValueError, "device: expected a device such as 'cpu'"),
        ({"role": None}, TypeError, "role: expected a str"),
        ({"rows": -1}, ValueError, "rows: expected an int >= 0"),
        ({"width": 0}, ValueError, "width: expected an int >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"rows": 4, "width": 8, "dtype": torch.bfloat16, "device": CPU, "role": "acc", **kwargs}
    with pytest.raises(error, match=match):
        BufferPool().get(**args)


def test_a_device_string_is_the_same_buffer():
    pool = BufferPool()
    a = pool.get(4, 8, torch.float32, "cpu", "acc")
    assert pool.get(2, 8, torch.float32, CPU, "acc").data_ptr() == a.data_ptr()
    assert pool.get(0, 8, torch.float32, CPU, "acc").shape == (0, 8)


def test_counters_start_at_zero_and_are_one_tensor_per_role_and_width():
    pool = BufferPool()
    a = pool.counters(9, CPU, "ready")
    assert a.shape == (9,) and a.dtype == torch.int32 and not a.any()
    a[3] = 7  # the pool never resets them: keeping them at 0 is their users' job
    again = pool.counters(9, "cpu", "ready")
    assert again.data_ptr() == a.data_ptr() and again[3] == 7
    assert pool.counters(9, CPU, "other").data_ptr() != a.data_ptr()
    assert not pool.counters(17, CPU, "ready").any()
    assert pool.get(1, 9, torch.int32, CPU, "ready").data_ptr() != a.data_ptr()  # not a workspace
    for kwargs, match in (({"width": 0}, "width: expected an int >= 1"), ({"role": 3}, "role: expected a str")):
        with pytest.raises((ValueError, TypeError), match=match):
            pool.counters(**{"width": 4, "device": CPU, "role": "ready", **kwargs})


@pytest.mark.gpu
def test_counters_first_needed_inside_capture_is_an_error():
    pool = BufferPool()
    dev = torch.device("cuda")
    with pytest.raises(BufferGrowthInCaptureError, match="first needed while a CUDA graph is being captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pool.counters(5, dev, "ready")
