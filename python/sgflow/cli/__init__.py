"""The ``sgflow`` command line: ``train``, ``sample``, ``eval``, ``demo``, ``quality`` and ``list``.

    sgflow demo --out /tmp/demo                       # ~1 min on a CPU: train, plot, score
    sgflow train --data ring8 --steps 3000 --out runs/ring8
    sgflow train --data digits --model digits --steps 20000 --batch-size 128 --out runs/digits
    sgflow train --resume runs/ring8 --steps 6000     # continue (bit-exact) to 6000 steps
    sgflow sample runs/ring8 --steps 1 2 4 --n 2000 --out runs/ring8/samples
    sgflow eval runs/ring8 --steps 1 2 4 8 16 --baseline
    sgflow quality --quick --out runs/quality         # every method vs NFE: JSON, Markdown table, figure
    torchrun --nproc_per_node=4 -m sgflow.cli train --data cifar10 --data-root ~/data --model cifar10 ...

User errors (unknown names, missing files, bad checkpoints, bad batch sizes) print one line
``sgflow: error: ...`` on stderr and exit with status 1 (2 for malformed command lines).
"""
# The package, by job: common (errors, parsing helpers), training (train, distill), sample_eval (sample, eval),
# demo, parser (the parser, quality, list, main). Every name the single module cli.py had is importable from here.
from sgflow.cli.common import (  # noqa: F401 (the private helpers too)
    EXIT_USAGE,
    EXIT_USER_ERROR,
    CLIError,
    _device,
    _parse_kv,
    _parse_value,
    _positive_ints,
    _set_threads,
    _user_errors,
)
from sgflow.cli.training import (  # noqa: F401
    _TRAIN_FIELDS,
    DISTILL_DEFAULTS,
    _add_distill,
    _add_teacher_options,
    _add_train,
    build_train_config,
    cmd_distill,
    cmd_train,
)
from sgflow.cli.sample_eval import _add_eval, _add_sample, _sampler, cmd_eval, cmd_sample  # noqa: F401
from sgflow.cli.demo import DEMO_DEFAULTS, _add_demo, cmd_demo  # noqa: F401
from sgflow.cli.parser import (  # noqa: F401
    _add_quality,
    _error_prefix,
    _one_line,
    _Parser,
    cmd_list,
    cmd_quality,
    main,
    make_parser,
)
