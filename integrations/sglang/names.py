"""Make ``moe_backend`` a valid value of SGLang's ``--moe-runner-backend``.

SGLang keeps the argparse choices in a list that out-of-tree code may extend
(``add_moe_runner_backend_choices``); parsers built afterwards list and accept
the name, any other unknown name is still rejected. The name is also registered
as a runner backend when the runner core is (``runner.register_core``).
"""

from __future__ import annotations

from .support import BACKEND_NAME


def accept_backend_name() -> None:
    """Add :data:`BACKEND_NAME` to the ``--moe-runner-backend`` choices (idempotent)."""
    from sglang.srt.arg_groups import choices

    if BACKEND_NAME not in choices.MOE_RUNNER_BACKEND_CHOICES:
        choices.add_moe_runner_backend_choices([BACKEND_NAME])
