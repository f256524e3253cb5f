"""Let PyPI's torchvision (a CUDA build) import next to a CPU-only torch, for the SGLang tests only.

Its C++ operators cannot load without CUDA torch, and torchvision 0.28/0.29 then
fail at import while registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, whose schemas that library would have defined. Defining
the two schemas (no kernels) lets the Python parts import; SGLang's MoE layer,
server arguments and model runner call none of torchvision's operators.
scripts/ci_install_sglang.sh installs that torchvision into its own folder, which
the tests' conftest puts on PYTHONPATH after this one.
"""

import torch

if torch.version.cuda is None:
    _LIB = torch.library.Library("torchvision", "DEF")
    for _op in ("nms", "qnms"):
        _LIB.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
