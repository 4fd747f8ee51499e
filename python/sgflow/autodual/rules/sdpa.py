r"""Attention: ``F.scaled_dot_product_attention`` to the dual attention op (``attention_dual``); masks,
causal, dropout and grouped heads through the math form, each op by its own rule."""
from __future__ import annotations

from sgflow.autodual.rules.common import _bind, _tangent_or_zeros
from sgflow.autodual.tensor import make_dual, primal


def _sdpa_rule(func, args, kwargs):
    b = _bind(
        args, kwargs,
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    )
    q, k, v = b["query"], b["key"], b["value"]
    plain = b["attn_mask"] is None and not b["dropout_p"] and not b["is_causal"]
    same_heads = primal(q).shape[:-2] == primal(k).shape[:-2] == primal(v).shape[:-2]
    if plain and same_heads and primal(q).dim() >= 3:
        from sgflow.autodual.call import kept_attention
        from sgflow.ops.attention import attention_dual

        qp = primal(q)
        lead = qp.shape[:-2]

        def four(t):
            return t.reshape(-1, 1, *t.shape[-2:]) if t.dim() != 4 else t

        parts = [four(primal(a)) for a in (q, k, v)] + [four(_tangent_or_zeros(a)) for a in (q, k, v)]
        o, od = attention_dual(*parts, scale=b["scale"], kept=kept_attention())
        return make_dual(o.reshape(*lead, *o.shape[-2:]), od.reshape(*lead, *od.shape[-2:]))
    # Masks, causal, dropout or grouped heads: the math form, each op through its own rule.
    from sgflow.decompose import scaled_dot_product_attention as sdpa_math

    return sdpa_math(q, k, v, attn_mask=b["attn_mask"], dropout_p=b["dropout_p"], is_causal=b["is_causal"],
                     scale=b["scale"], enable_gqa=b["enable_gqa"])
