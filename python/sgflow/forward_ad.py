"""Is this error "PyTorch's forward-mode AD cannot run this"? One classifier, used by the reference loss
(``sgflow_loss(jvp="auto")`` then switches to the double-VJP JVP) and by the dual engine's forward-AD fallback
(``sgflow.autodual``: it then names the op and says how to register a rule). Anything else is a genuine error
and propagates unchanged."""
from __future__ import annotations

import re

# Messages of torch errors that mean "forward-mode AD cannot run this": an op (or autograd.Function) without a
# forward-mode rule, or an in-place update of a captured tensor (BatchNorm's running statistics in training mode),
# which torch.func transforms refuse and plain autograd allows.
_NO_FORWARD_AD = (
    re.compile(r"Trying to use forward AD with (?P<op>[\w.:]+) that does not support it"),
    re.compile(r"transform, the function provided attempted to call in-place operation \((?P<inplace>[\w.:]+)\) "
               r"that would mutate a captured Tensor"),
    re.compile(r"autograd\.Function with functorch transforms.*must override the setup_context", re.S),
    re.compile(r"must implement the jvp function for custom autograd\.Function"),
    re.compile(r"forward[- ]mode AD (is )?not (yet )?(implemented|supported)", re.I),
    re.compile(r"\bjvp\b.*\bnot (yet )?(implemented|supported)\b", re.I),
)


def missing_forward_ad(err: BaseException) -> str | None:
    """A one-line description when ``err`` says forward-mode AD is missing for some op, else None."""
    text = str(err)
    for pattern in _NO_FORWARD_AD:
        m = pattern.search(text)
        if m:
            groups = m.groupdict()
            if groups.get("op"):
                return f"{groups['op']} has no forward-mode AD formula"
            if groups.get("inplace"):
                return (f"torch.func.jvp refuses the in-place {groups['inplace']} on a captured tensor "
                        "(e.g. a BatchNorm running statistic in training mode)")
            return text.strip().splitlines()[0]
    return None
